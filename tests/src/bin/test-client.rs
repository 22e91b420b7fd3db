//! A client process for the integration tests, with a test-double scorer: it can be
//! killed with SIGKILL mid-round, which no in-process client can imitate.
//!
//! `test-client ADDR IDENTITY_DIR MODE [P]`, MODE = `score` (take part in one round) or
//! `hang` (receive the batch, print `got-batch`, then wait forever without replying).

use std::io::Write;

use crosslm_sdk::rounds::participate;
use crosslm_sdk::transport::{Event, Identity, Session};
use crosslm_tests::{FixedScorer, info};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, dir, mode, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: test-client ADDR IDENTITY_DIR score|hang [P]");
    };
    let p: f32 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0.9);
    let id = Identity::load(std::path::Path::new(dir))?;
    let mut session = Session::connect(addr.parse()?, &id, info("proc", 10)).await?;
    match mode.as_str() {
        "score" => {
            let (_, n) = participate(&mut session, FixedScorer { p }, Some(1)).await?;
            println!("rounds={n}");
        }
        "hang" => loop {
            if let Event::Round { .. } = session.next_event().await? {
                println!("got-batch");
                std::io::stdout().flush()?;
            }
        },
        m => anyhow::bail!("unknown mode {m}"),
    }
    Ok(())
}
