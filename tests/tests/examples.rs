//! The SDK's and the coordinator's example programs, run as a newcomer runs them: the
//! coordinator example (the real LLM) prints a token and its address; the client example
//! enrolls with it, trains, takes part in a round and says so.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crosslm_tests::*;

/// Kills the coordinator when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn example_client_completes_a_round_with_the_example_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = Running(
        Command::new(example_bin("coordinator"))
            .args([
                "--clients",
                "1",
                "--rounds",
                "1",
                "--samples-per-label",
                "2",
            ])
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("coord"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the coordinator example"),
    );
    let mut lines = BufReader::new(coord.0.stdout.take().expect("stdout")).lines();
    let mut token = None;
    let addr = loop {
        let line = lines
            .next()
            .expect("the coordinator example ended before it listened")
            .expect("read its output");
        if let Some(t) = line.strip_prefix("enrollment token: ") {
            token = Some(t.to_string());
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    let token = token.expect("a token before the address");
    let data = write_private_data(dir.path(), 40);
    let out = Command::new(example_bin("client"))
        .args(["--coordinator", &addr, "--token", &token, "--data"])
        .arg(&data)
        .arg("--dir")
        .arg(dir.path().join("phone"))
        .output()
        .expect("run the client example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("enrolled as client-"), "{stdout}");
    assert!(stdout.contains("took part in 1 rounds"), "{stdout}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l == "1 rounds finished"),
        "coordinator said: {rest:?}"
    );
    assert!(coord.0.wait().expect("coordinator exit").success());
}
