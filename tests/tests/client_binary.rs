//! The desktop client binary against the real coordinator daemon on 127.0.0.1: it enrolls,
//! trains the light bag model on a small private file, completes a round and reports; its
//! `status` shows what happened; Ctrl-C while waiting for a round leaves cleanly and keeps
//! the checkpoint; bad input gets a clear error.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crosslm_tests::*;

fn client(args: &[&str]) -> Output {
    Command::new(bin("crosslm-client"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run crosslm-client")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A client config file: bag model, the private file, a held-out quarter.
fn write_config(dir: &Path, coordinator: &str, data: &Path) -> std::path::PathBuf {
    let p = dir.join("client.toml");
    std::fs::write(
        &p,
        format!(
            r#"
coordinator = "{coordinator}"
data_dir = "client-data"
name = "binary-test"
arch = "bag"
data = "{}"
test_fraction = 0.25
train_epochs = 20
round_epochs = 2
connect_timeout_ms = 5000
"#,
            data.display()
        ),
    )
    .expect("write client config");
    p
}

#[test]
fn binary_enrolls_trains_and_completes_a_round() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = CoordinatorProcess::start(dir.path(), 1, 20, 1, 1);
    let addr = coord.addr.to_string();
    let data = write_private_data(dir.path(), 40);
    let cfg = write_config(dir.path(), &addr, &data);
    let cfg = cfg.to_str().unwrap();

    let out = client(&["enroll", "--config", cfg, "--token", &coord.tokens[0]]);
    assert!(out.status.success(), "enroll: {}", text(&out.stderr));
    let enrolled = text(&out.stdout);
    assert!(enrolled.starts_with("enrolled as "), "{enrolled}");
    // The same token again: refused, with the reason.
    let out = client(&["enroll", "--config", cfg, "--token", &coord.tokens[0]]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("token"), "{}", text(&out.stderr));

    let start = Instant::now();
    let out = client(&["join", "--config", cfg, "--rounds", "1"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "join: {stdout}\n{}",
        text(&out.stderr)
    );
    eprintln!("join took {:.1}s:\n{stdout}", start.elapsed().as_secs_f64());
    assert!(
        stdout.contains("private data: 30 examples (10 held out"),
        "{stdout}"
    );
    assert!(stdout.contains("trained: "), "{stdout}");
    assert!(
        stdout.contains("round 1 finished, local accuracy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("took part in 1 round(s); last round 1"),
        "{stdout}"
    );

    // Persisted: the checkpoint and the state file; `status` shows them.
    let data_dir = dir.path().join("client-data");
    assert!(data_dir.join("checkpoint/meta.json").is_file());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["last_round"], 1);
    assert_eq!(state["rounds_completed"], 1);
    assert_eq!(state["coordinator"], addr.as_str());
    let acc = state["local_accuracy"].as_f64().expect("accuracy");
    assert!((0.0..=1.0).contains(&acc));
    let out = client(&["status", "--config", cfg, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["last_round"], 1);
    assert_eq!(status["arch"], "bag");
    assert_eq!(
        status["labels"],
        serde_json::json!(["negative", "positive"])
    );
    let client_id = status["client_id"].as_str().expect("client id").to_string();
    assert!(enrolled.contains(&client_id));
    let human = text(&client(&["status", "--config", cfg]).stdout);
    assert!(
        human.contains("last round:       1") && human.contains(&client_id),
        "{human}"
    );

    // The coordinator took our reply and report for round 1.
    assert!(coord.wait(Duration::from_secs(60)).success());
    let out = Command::new(bin("crosslm-coordinator"))
        .args(["status", "--data-dir"])
        .arg(&coord.data_dir)
        .output()
        .unwrap();
    let cs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let round = &cs["rounds"][0];
    assert_eq!(round["phase"], "Done", "{cs}");
    assert!(round["replies"].to_string().contains(&client_id), "{cs}");
    assert!(
        cs["client_reports"][0]["local_accuracy"]
            .to_string()
            .contains(&client_id),
        "{cs}"
    );
}

#[test]
fn ctrl_c_while_waiting_leaves_cleanly_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Two clients needed: no round ever opens for our one client.
    let coord = CoordinatorProcess::start(dir.path(), 1, 5, 2, 1);
    let data = write_private_data(dir.path(), 20);
    let cfg = write_config(dir.path(), &coord.addr.to_string(), &data);
    let cfg = cfg.to_str().unwrap();
    let out = client(&["enroll", "--config", cfg, "--token", &coord.tokens[0]]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut join = Command::new(bin("crosslm-client"))
        .args(["join", "--config", cfg, "--train-epochs", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = join.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("joined line").unwrap();
        seen.push(line.clone());
        if line.starts_with("joined ") {
            break;
        }
    }
    let started = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &join.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = join.wait().unwrap();
    assert!(status.success(), "{status:?}: {seen:?} {rest:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "left promptly");
    assert!(
        rest.iter()
            .any(|l| l.contains("took part in 0 round(s) (stopped)")),
        "{rest:?}"
    );
    let ckpt = dir.path().join("client-data/checkpoint");
    assert!(ckpt.join("meta.json").is_file(), "checkpoint kept");
    let out = Command::new(bin("crosslm-client"))
        .args(["slm", "eval", "--checkpoint"])
        .arg(&ckpt)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "checkpoint loads: {}",
        text(&out.stderr)
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let dd = format!("{d}/c");
    // Unreachable coordinator: nothing listens on this port.
    let port = free_udp_port();
    let token = format!("xlm1.{}.{}", "ab".repeat(16), "cd".repeat(32));
    let out = client(&[
        "enroll",
        "--coordinator",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &dd,
        "--token",
        &token,
        "--connect-timeout-ms",
        "1500",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unreachable"), "{err}");
    // Malformed token.
    let out = client(&[
        "enroll",
        "--coordinator",
        "127.0.0.1:9",
        "--data-dir",
        &dd,
        "--token",
        "xyz",
    ]);
    assert!(
        text(&out.stderr).contains("malformed token"),
        "{}",
        text(&out.stderr)
    );
    // Join before enrolling; missing data file; missing config file.
    let out = client(&[
        "join",
        "--coordinator",
        "127.0.0.1:9",
        "--data-dir",
        &dd,
        "--checkpoint",
        d,
    ]);
    assert!(
        text(&out.stderr).contains("not enrolled"),
        "{}",
        text(&out.stderr)
    );
    let out = client(&[
        "join",
        "--data-dir",
        &dd,
        "--data",
        &format!("{d}/nope.jsonl"),
    ]);
    assert!(
        text(&out.stderr).contains("nope.jsonl"),
        "{}",
        text(&out.stderr)
    );
    let out = client(&["status", "--config", &format!("{d}/nope.toml")]);
    assert!(
        text(&out.stderr).contains("nope.toml"),
        "{}",
        text(&out.stderr)
    );
    let out = client(&["status", "--data-dir", &dd]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("enrolled:         no"),
        "{}",
        text(&out.stdout)
    );
}

/// `slm score` of a checkpoint on a data file: each line's probability of "positive".
fn positive_probs(ckpt: &Path, data: &Path) -> Vec<f64> {
    let out = Command::new(bin("crosslm-client"))
        .args(["slm", "score", "--checkpoint"])
        .arg(ckpt)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run crosslm-client");
    assert!(out.status.success(), "score: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("score line is JSON");
            v["probs"]["positive"]
                .as_f64()
                .expect("a positive probability")
        })
        .collect()
}

#[test]
fn slm_train_continues_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_private_data(dir.path(), 40);
    let first = dir.path().join("first");
    let train = |extra: &[&str], out: &Path, data: &Path| {
        let out = Command::new(bin("crosslm-client"))
            .args(["slm", "train", "--val-fraction", "0", "--out"])
            .arg(out)
            .arg("--data")
            .arg(data)
            .args(extra)
            .output()
            .expect("run crosslm-client");
        (out.status.success(), text(&out.stderr))
    };
    let (ok, err) = train(&["--arch", "bag", "--epochs", "5"], &first, &data);
    assert!(ok, "first training: {err}");

    // A file whose first row has the other label still loads onto the checkpoint (this does
    // not check the mapping itself: at this learning rate nothing moves). A learning rate too
    // small to move anything leaves the checkpoint's predictions as they were; a new model
    // (what the flag, if ignored, would train) predicts differently.
    let swapped = dir.path().join("swapped.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut reordered: Vec<String> = lines.iter().skip(1).cloned().collect();
    reordered.push(lines[0].clone());
    std::fs::write(&swapped, reordered.join("\n") + "\n").unwrap();
    let second = dir.path().join("second");
    let init = first.to_str().unwrap();
    let (ok, err) = train(
        &["--init", init, "--epochs", "1", "--lr", "1e-12"],
        &second,
        &swapped,
    );
    assert!(ok, "continued training: {err}");
    assert!(err.contains("continuing the bag checkpoint"), "{err}");
    let before = positive_probs(&first, &data);
    let after = positive_probs(&second, &data);
    assert_eq!(before.len(), 40);
    for (b, a) in before.iter().zip(&after) {
        assert!((b - a).abs() < 1e-4, "{b} -> {a}");
    }
    let fresh = dir.path().join("fresh");
    let (ok, err) = train(
        &["--arch", "bag", "--epochs", "1", "--lr", "1e-12"],
        &fresh,
        &swapped,
    );
    assert!(ok, "{err}");
    let new = positive_probs(&fresh, &data);
    assert!(
        before.iter().zip(&new).any(|(b, n)| (b - n).abs() > 1e-3),
        "a new model should not predict as the trained one"
    );

    // A label the checkpoint does not know: the row is refused by name.
    let meh = dir.path().join("meh.jsonl");
    std::fs::write(&meh, "{\"text\": \"so so\", \"label\": \"meh\"}\n").unwrap();
    let (ok, err) = train(&["--init", init], &dir.path().join("x"), &meh);
    assert!(!ok);
    assert!(err.contains("unknown label \"meh\""), "{err}");
}
