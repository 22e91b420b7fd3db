//! Authentication and hostile input over real QUIC: clients without a valid certificate
//! are refused; malformed, oversized and wrong-version frames get an error while the
//! coordinator keeps serving everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::FileGenerator;
use crosslm_coordinator::round::RoundConfig;
use crosslm_coordinator::transport::Revoked;
use crosslm_sdk::Error;
use crosslm_sdk::protocol::{ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg, frame};
use crosslm_sdk::rounds::participate;
use crosslm_sdk::transport::tls::{self, SERVER_NAME};
use crosslm_sdk::transport::{EnrollToken, Identity, Session, enroll};
use crosslm_tests::*;

async fn daemon(dir: &std::path::Path, tokens: usize) -> (Daemon, Vec<EnrollToken>) {
    daemon_with(dir, tokens, DaemonConfig::default().max_unauthenticated).await
}

async fn daemon_with(
    dir: &std::path::Path,
    tokens: usize,
    max_unauthenticated: usize,
) -> (Daemon, Vec<EnrollToken>) {
    let (_, task) = write_task(dir);
    let samples = write_samples(dir, 10);
    let cfg = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("coord"),
        rounds: Some(1),
        samples_per_label: 5,
        min_clients: 1,
        round: RoundConfig {
            quorum: 1,
            deadline_ms: 60_000,
            ..Default::default()
        },
        idle_timeout_ms: 10_000, // a loaded 2-core CI machine can stall a runtime for seconds
        linger_ms: 10_000,
        learning: None,
        privacy: None,
        admin: None,
        max_unauthenticated,
    };
    let tokens = mint_tokens(&cfg.data_dir, tokens).unwrap();
    let g = FileGenerator::load(&samples, &task).unwrap();
    (Daemon::start(cfg, task, Box::new(g)).await.unwrap(), tokens)
}

/// An enrolled client connects and takes part in one round (scoring every sample 0.9);
/// returns its session, still open.
async fn one_round(addr: SocketAddr, id: &Identity, name: &str) -> Session {
    let mut s = Session::connect(addr, id, info(name, 5)).await.unwrap();
    let (_, n) = participate(&mut s, FixedScorer { p: 0.9 }, Some(1))
        .await
        .unwrap();
    assert_eq!(n, 1);
    s
}

async fn raw(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(cfg, addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv)
}

async fn expect_error(recv: &mut quinn::RecvStream, code: ErrorCode) -> String {
    loop {
        let m: ServerMsg = tokio::time::timeout(Duration::from_secs(10), frame::read(recv))
            .await
            .unwrap()
            .unwrap();
        match m {
            ServerMsg::Error(e) => {
                assert_eq!(e.code, code, "{e}");
                return e.message;
            }
            // A session may see a round open before its bad frame is read.
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, tokens) = daemon(dir.path(), 2).await;
    let addr = d.addr;
    let id = enroll_with(addr, &tokens[0], "good").await;

    // No certificate: may say hello, may not do anything but enroll.
    let (_ep, _c, mut send, mut recv) = raw(addr, tls::anonymous_config(&id.ca_der).unwrap()).await;
    frame::write(&mut send, &ClientMsg::hello(info("anon", 1)))
        .await
        .unwrap();
    let ServerMsg::Welcome {
        client_id: None, ..
    } = frame::read(&mut recv).await.unwrap()
    else {
        panic!()
    };
    frame::write(
        &mut send,
        &ClientMsg::Scores {
            round: 1,
            scores: vec![],
            last: true,
        },
    )
    .await
    .unwrap();
    let msg = expect_error(&mut recv, ErrorCode::Unauthenticated).await;
    assert!(msg.contains("enroll"), "{msg}");

    // A certificate from another CA fails the TLS handshake.
    let other = tempfile::tempdir().unwrap();
    let other_pki = crosslm_coordinator::transport::Pki::load_or_create(other.path()).unwrap();
    let (key, csr) = tls::new_key_and_csr("mallory").unwrap();
    let forged = Identity {
        client_id: "client-x".into(),
        cert_der: other_pki.sign_client(&csr, "client-x").unwrap(),
        key_der: key,
        ca_der: id.ca_der.clone(), // trusts the real coordinator
    };
    let r = Session::connect(addr, &forged, info("mallory", 1)).await;
    assert!(
        matches!(r, Err(Error::Session(_)) | Err(Error::Protocol(_))),
        "forged cert accepted: {:?}",
        r.err()
    );

    // Tokens: reuse, garbage secret, wrong coordinator.
    let reuse = enroll(addr, &tokens[0], info("again", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&reuse, Error::Refused(e) if e.code == ErrorCode::BadToken),
        "{reuse}"
    );
    let fake = EnrollToken {
        secret: "00".repeat(16),
        ca_fingerprint: tokens[1].ca_fingerprint.clone(),
    };
    let e = enroll(addr, &fake, info("fake", 1)).await.unwrap_err();
    assert!(e.to_string().contains("unknown token"), "{e}");
    let pinned_elsewhere = EnrollToken {
        secret: tokens[1].secret.clone(),
        ca_fingerprint: "ab".repeat(32),
    };
    assert!(
        enroll(addr, &pinned_elsewhere, info("x", 1)).await.is_err(),
        "CA pin must be checked"
    );

    // The enrolled client still gets served.
    let s = one_round(addr, &id, "good").await;
    s.close().await;
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_coordinator_keeps_serving() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, tokens) = daemon(dir.path(), 2).await;
    let addr = d.addr;
    let bad = enroll_with(addr, &tokens[0], "bad").await;
    let good = enroll_with(addr, &tokens[1], "good").await;
    let cfg = || tls::session_config(&bad).unwrap();

    // Wrong protocol version in the hello.
    let (_e1, _c1, mut send, mut recv) = raw(addr, cfg()).await;
    frame::write(
        &mut send,
        &ClientMsg::Hello {
            version: PROTOCOL_VERSION + 7,
            info: info("bad", 1),
        },
    )
    .await
    .unwrap();
    let m = expect_error(&mut recv, ErrorCode::VersionMismatch).await;
    assert!(m.contains(&format!("v{}", PROTOCOL_VERSION + 7)), "{m}");

    // Oversized frame: a length prefix past the limit.
    let (_e2, _c2, mut send, mut recv) = raw(addr, cfg()).await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    expect_error(&mut recv, ErrorCode::TooLarge).await;

    // Garbage as the first frame.
    let (_e3, _c3, mut send, mut recv) = raw(addr, cfg()).await;
    send.write_all(&[0, 0, 0, 3, 0xde, 0xad, 0xbe])
        .await
        .unwrap();
    expect_error(&mut recv, ErrorCode::Malformed).await;

    // Garbage after a good hello, inside a session.
    let (_e4, _c4, mut send, mut recv) = raw(addr, cfg()).await;
    frame::write(&mut send, &ClientMsg::hello(info("bad", 1)))
        .await
        .unwrap();
    send.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    expect_error(&mut recv, ErrorCode::Malformed).await;

    // Oversized inside a session.
    let (_e5, _c5, mut send, mut recv) = raw(addr, cfg()).await;
    frame::write(&mut send, &ClientMsg::hello(info("bad", 1)))
        .await
        .unwrap();
    send.write_all(&((64u32 << 20).to_be_bytes()))
        .await
        .unwrap();
    expect_error(&mut recv, ErrorCode::TooLarge).await;

    // A frame of exactly the size limit is read whole (no TooLarge), then judged: garbage.
    let (_e6, _c6, mut send, mut recv) = raw(addr, cfg()).await;
    frame::write(&mut send, &ClientMsg::hello(info("bad", 1)))
        .await
        .unwrap();
    let limit = crosslm_sdk::protocol::MAX_FRAME_LEN;
    send.write_all(&(limit as u32).to_be_bytes()).await.unwrap();
    send.write_all(&vec![0xff; limit]).await.unwrap();
    expect_error(&mut recv, ErrorCode::Malformed).await;

    // Through all that, a well-behaved client completes a round.
    let s = one_round(addr, &good, "good").await;
    s.close().await;
    assert_eq!(d.wait().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_with_the_reason_while_others_are_served() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, tokens) = daemon(dir.path(), 2).await;
    let addr = d.addr;
    let lost = enroll_with(addr, &tokens[0], "lost").await;
    let kept = enroll_with(addr, &tokens[1], "kept").await;
    Session::connect(addr, &lost, info("lost", 1))
        .await
        .expect("served before revocation")
        .close()
        .await;

    // What `crosslm-coordinator revoke` does, while the daemon runs.
    Revoked::open(&dir.path().join("coord"))
        .revoke(&lost.client_id, "device reported stolen", 1)
        .unwrap();
    let e = Session::connect(addr, &lost, info("lost", 1))
        .await
        .err()
        .expect("a revoked certificate is refused");
    assert!(
        matches!(&e, Error::Refused(m) if m.code == ErrorCode::Unauthenticated),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("certificate revoked by the operator: device reported stolen"),
        "{e}"
    );

    let s = one_round(addr, &kept, "kept").await;
    s.close().await;
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_greedy_peers_are_cut_off_while_a_round_completes() {
    const FLOOD: usize = 100;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, tokens) = daemon(dir.path(), 1).await;
    let addr = d.addr;
    let honest = enroll_with(addr, &tokens[0], "honest").await;

    // A flood of slow-loris peers: a handshake and a stream each, then silence.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(raw(addr, tls::anonymous_config(&honest.ca_der).unwrap()).await);
    }
    // A peer may open one stream (its session or enrollment), not a second.
    let (_ep2, conn, mut send, mut recv) =
        raw(addr, tls::anonymous_config(&honest.ca_der).unwrap()).await;
    frame::write(&mut send, &ClientMsg::hello(info("greedy", 1)))
        .await
        .unwrap();
    assert!(matches!(
        frame::read::<ServerMsg, _>(&mut recv).await.unwrap(),
        ServerMsg::Welcome { .. }
    ));
    let second = tokio::time::timeout(Duration::from_secs(2), async {
        let (mut s, _) = conn.open_bi().await?;
        s.write_all(b"x").await?;
        anyhow::Ok(())
    })
    .await;
    assert!(second.is_err(), "a second stream was granted");

    // The honest client's round is not held up by either.
    let s = one_round(addr, &honest, "honest").await;

    // Every silent peer is closed by the hello timeout (10 s), with a reason.
    for (_ep, silent, _s, _r) in &flood {
        let closed = tokio::time::timeout(Duration::from_secs(30), silent.closed())
            .await
            .expect("silent peer closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if &c.reason[..] == b"timeout"),
            "{closed:?}"
        );
    }
    s.close().await;
    drop((send, recv, conn));
    d.wait().await.unwrap();
}

/// Peers without a certificate have few places (here 3): a fourth is closed as busy right
/// after its handshake, an enrollment meanwhile fails with an error worth retrying, an
/// enrolled client still completes its round, and once the silent peers time out an
/// enrollment goes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_cannot_crowd_out_enrolled_clients() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, tokens) = daemon_with(dir.path(), 2, 3).await;
    let addr = d.addr;
    let honest = enroll_with(addr, &tokens[0], "honest").await;

    let anonymous = || tls::anonymous_config(&honest.ca_der).unwrap();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(raw(addr, anonymous()).await);
    }
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let fourth = ep
        .connect_with(anonymous(), addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), fourth.closed())
        .await
        .expect("closed at once");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(crosslm_sdk::protocol::CLOSE_BUSY)
                && &c.reason[..] == b"too many connections without a certificate"),
        "{closed:?}"
    );
    let e = enroll(addr, &tokens[1], info("late", 10))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Session(crosslm_sdk::SessionError::Busy(_))) && e.is_link_failure(),
        "{e:?}"
    );
    assert!(e.to_string().contains("busy"), "{e}");

    // Enrolled clients do not need one of those places.
    let s = one_round(addr, &honest, "honest").await;
    s.close().await;

    // The silent peers are closed by the hello timeout (10 s), freeing their places.
    for (_ep, c, _s, _r) in &silent {
        tokio::time::timeout(Duration::from_secs(30), c.closed())
            .await
            .expect("silent peer closed");
    }
    let late = enroll(addr, &tokens[1], info("late", 10)).await.unwrap();
    assert!(!late.client_id.is_empty());
    d.wait().await.unwrap();
}
