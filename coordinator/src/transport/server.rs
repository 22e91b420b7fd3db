//! Accepts QUIC connections and runs one session task per client.
//!
//! A session is one bidirectional stream of frames. The first frame must be a `Hello` of
//! our protocol version. A connection with a certificate of ours that the store knows is a
//! client session; a connection without one may only enroll. Anything malformed gets an
//! error frame and the connection is closed; other sessions are not affected.

use std::sync::Arc;
use std::time::Duration;

use crosslm_sdk::protocol::{
    CLOSE_BUSY, ClientInfo, ClientMsg, ErrorCode, ErrorMsg, FrameError, PROTOCOL_VERSION,
    ServerMsg, frame,
};
use crosslm_sdk::transport::EnrollToken;
use crosslm_sdk::transport::tls::fingerprint;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::core::{Input, Outbound, now_ms};
use crate::store::{ClientRecord, Store};
use crate::transport::{Pki, Revoked, Tokens};

/// What a session task tells the daemon's driver: an input for the [`crate::core::Core`] and,
/// with a new connection, that connection's outbound queue (which the driver keeps).
#[derive(Debug)]
pub struct CoreEvent {
    /// The core's input.
    pub input: Input,
    /// The queue of a [`Input::Connected`] connection.
    pub queue: Option<mpsc::Sender<Outbound>>,
}

impl From<Input> for CoreEvent {
    fn from(input: Input) -> Self {
        Self { input, queue: None }
    }
}

/// Shared by every session task.
pub struct ServerCtx {
    /// The CA.
    pub pki: Pki,
    /// Enrollment tokens.
    pub tokens: Tokens,
    /// Revoked clients.
    pub revoked: Revoked,
    /// The database.
    pub store: Arc<Store>,
    /// Events for the round core.
    pub core: mpsc::Sender<CoreEvent>,
    /// Room for connections without a client certificate (`DaemonConfig::max_unauthenticated`).
    pub unauthenticated: Arc<tokio::sync::Semaphore>,
    /// Connections closed as busy so far (the log names one in a thousand).
    pub busy: std::sync::atomic::AtomicU64,
}

/// How long a peer may take to open its stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once (handshaking, enrolling or in session); past it new ones are
/// refused before any TLS work, so a flood cannot exhaust memory or file handles.
pub const MAX_CONNECTIONS: usize = 16_384;

/// Accepts connections until the endpoint closes, then waits for the sessions to end (so
/// the store is released when this returns).
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx>) {
    let mut sessions = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        // Reap finished sessions so the set does not grow with every connection ever made.
        while sessions.try_join_next().is_some() {}
        if sessions.len() >= MAX_CONNECTIONS {
            refused += 1;
            // One line per thousand: a flood must not flood the log too.
            if refused % 1000 == 1 {
                tracing::warn!(remote = %incoming.remote_address(), refused, "connection limit reached; refusing");
            }
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    // Held for the connection's life: a peer without a certificate takes
                    // one of the few places for such peers, or is told to come back later.
                    let _place = if client_fingerprint(&conn).is_some() {
                        None
                    } else {
                        match ctx.unauthenticated.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                let n = ctx.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if n.is_multiple_of(1000) {
                                    tracing::warn!(%remote, busy = n + 1, "too many connections without a certificate; closing as busy");
                                }
                                conn.close(CLOSE_BUSY.into(), BUSY_REASON);
                                return;
                            }
                        }
                    };
                    session(conn, ctx).await
                }
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "connection refused during TLS handshake")
                }
            }
        });
    }
    drop(ctx);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
}

/// What a peer closed as busy is told.
const BUSY_REASON: &[u8] = b"too many connections without a certificate";

/// The fingerprint of the peer's client certificate (verified against our CA by the
/// handshake), if it presented one.
fn client_fingerprint(conn: &quinn::Connection) -> Option<String> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| fingerprint(c.as_ref())))
}

fn err(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error(ErrorMsg {
        code,
        message: message.into(),
    })
}

/// Reads the version from a Hello body before decoding the rest, so a peer of another
/// version gets a clear answer rather than "malformed".
fn peek_hello_version(body: &[u8]) -> Option<u16> {
    if body.first() != Some(&0) {
        return None;
    }
    postcard::take_from_bytes::<u16>(&body[1..])
        .ok()
        .map(|(v, _)| v)
}

async fn read_body(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(0) => FrameError::Closed,
        // The peer closed or vanished between frames: an end, not a protocol error.
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(_)) => FrameError::Closed,
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => FrameError::Io(e.into()),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > crosslm_sdk::protocol::MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    AsyncReadExt::read_exact(recv, &mut body)
        .await
        .map_err(|_| FrameError::Truncated)?;
    Ok(body)
}

fn frame_error_reply(e: &FrameError) -> Option<ServerMsg> {
    match e {
        FrameError::TooLarge(_) => Some(err(ErrorCode::TooLarge, e.to_string())),
        FrameError::Malformed(_) => Some(err(ErrorCode::Malformed, e.to_string())),
        _ => None,
    }
}

async fn session(conn: quinn::Connection, ctx: Arc<ServerCtx>) {
    let remote = conn.remote_address();
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "connection closed before opening a stream");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "no stream opened in time; closing");
            conn.close(1u32.into(), b"timeout");
            return;
        }
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_body(&mut recv)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            tracing::warn!(%remote, error = %e, "bad first frame");
            close_with(&conn, &mut send, frame_error_reply(&e)).await;
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "no hello in time; closing");
            conn.close(1u32.into(), b"timeout");
            return;
        }
    };
    let info = match peek_hello_version(&hello) {
        Some(PROTOCOL_VERSION) => match frame::decode::<ClientMsg>(&hello) {
            Ok(ClientMsg::Hello { info, .. }) => info,
            Ok(_) | Err(_) => {
                tracing::warn!(%remote, "malformed hello");
                close_with(
                    &conn,
                    &mut send,
                    Some(err(ErrorCode::Malformed, "malformed Hello")),
                )
                .await;
                return;
            }
        },
        Some(v) => {
            tracing::warn!(%remote, client_version = v, "protocol version mismatch");
            let msg =
                format!("client speaks protocol v{v}, this coordinator speaks v{PROTOCOL_VERSION}");
            close_with(&conn, &mut send, Some(err(ErrorCode::VersionMismatch, msg))).await;
            return;
        }
        None => {
            tracing::warn!(%remote, "first frame is not a Hello");
            close_with(
                &conn,
                &mut send,
                Some(err(ErrorCode::Malformed, "expected Hello first")),
            )
            .await;
            return;
        }
    };

    let cert_fp = client_fingerprint(&conn);
    let client = match &cert_fp {
        Some(fp) => match ctx.store.client_by_cert(fp) {
            Ok(Some(rec)) => match ctx.revoked.get(&rec.id) {
                Ok(None) => Some(rec),
                Ok(Some(r)) => {
                    tracing::warn!(%remote, client = %rec.id, reason = %r.reason, "revoked client refused");
                    let m = err(
                        ErrorCode::Unauthenticated,
                        format!("certificate revoked by the operator: {}", r.reason),
                    );
                    close_with(&conn, &mut send, Some(m)).await;
                    return;
                }
                Err(e) => {
                    tracing::error!(%remote, error = %e, "revocation check failed; refused");
                    close_with(
                        &conn,
                        &mut send,
                        Some(err(ErrorCode::Internal, "internal error")),
                    )
                    .await;
                    return;
                }
            },
            Ok(None) => {
                tracing::warn!(%remote, "certificate of our CA but unknown to the store; refused");
                let m = err(
                    ErrorCode::Unauthenticated,
                    "certificate not recognised; enroll again",
                );
                close_with(&conn, &mut send, Some(m)).await;
                return;
            }
            Err(e) => {
                tracing::error!(%remote, error = %e, "store lookup failed");
                close_with(
                    &conn,
                    &mut send,
                    Some(err(ErrorCode::Internal, "internal error")),
                )
                .await;
                return;
            }
        },
        None => None,
    };
    let welcome = ServerMsg::Welcome {
        version: PROTOCOL_VERSION,
        client_id: client.as_ref().map(|c| c.id.clone()),
    };
    if frame::write(&mut send, &welcome).await.is_err() {
        return;
    }
    match client {
        Some(rec) => client_session(conn, send, recv, rec, info, ctx).await,
        None => enroll_session(conn, send, recv, info, ctx).await,
    }
}

async fn close_with(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: Option<ServerMsg>,
) {
    if let Some(m) = msg {
        let _ = frame::write(send, &m).await;
    }
    let _ = send.finish();
    // Give the error frame a moment to leave before the close discards it.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(2u32.into(), b"error");
}

async fn enroll_session(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    info: ClientInfo,
    ctx: Arc<ServerCtx>,
) {
    let remote = conn.remote_address();
    let msg = match tokio::time::timeout(HELLO_TIMEOUT, read_body(&mut recv)).await {
        Ok(Ok(body)) => frame::decode::<ClientMsg>(&body),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Closed),
    };
    let reply = match msg {
        Ok(ClientMsg::Enroll { token, csr_der }) => match enroll(&ctx, &token, &csr_der, &info) {
            Ok(m) => {
                tracing::info!(%remote, name = %info.name, "client enrolled");
                m
            }
            Err(e) => {
                tracing::warn!(%remote, error = %e, "enrollment refused");
                err(ErrorCode::BadToken, e.to_string())
            }
        },
        Ok(other) => {
            tracing::warn!(%remote, msg = ?std::mem::discriminant(&other), "refused: no client certificate");
            err(
                ErrorCode::Unauthenticated,
                "no client certificate: enroll with a token first",
            )
        }
        Err(e) => {
            tracing::warn!(%remote, error = %e, "bad frame from unauthenticated peer");
            frame_error_reply(&e).unwrap_or_else(|| err(ErrorCode::Malformed, e.to_string()))
        }
    };
    close_with(&conn, &mut send, Some(reply)).await;
}

fn enroll(ctx: &ServerCtx, token: &str, csr: &[u8], info: &ClientInfo) -> crate::Result<ServerMsg> {
    let token = EnrollToken::parse(token)?;
    if token.ca_fingerprint != ctx.pki.ca_fingerprint() {
        return Err(crate::Error::Enroll(
            "token is for another coordinator".into(),
        ));
    }
    ctx.tokens.consume(&token.secret)?;
    let client_id = format!("client-{}", &fingerprint(csr)[..12]);
    let cert_der = ctx.pki.sign_client(csr, &client_id)?;
    ctx.store.add_client(&ClientRecord {
        id: client_id.clone(),
        cert_fingerprint: fingerprint(&cert_der),
        info: info.clone(),
        enrolled_at: now_ms(),
    })?;
    Ok(ServerMsg::Enrolled {
        client_id,
        cert_der,
        ca_der: ctx.pki.ca_der().to_vec(),
    })
}

async fn client_session(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    rec: ClientRecord,
    info: ClientInfo,
    ctx: Arc<ServerCtx>,
) {
    let remote = conn.remote_address();
    let client = rec.id.clone();
    if rec.info != info
        && let Err(e) = ctx.store.update_client_info(&client, &info)
    {
        tracing::warn!(%client, error = %e, "could not update client info");
    }
    tracing::info!(%remote, %client, arch = %info.slm_arch, n_private = info.n_private, "client connected");
    let (tx, mut rx) = mpsc::channel::<Outbound>(64);
    let conn_id = conn.stable_id();
    if ctx
        .core
        .send(CoreEvent {
            input: Input::Connected {
                client: client.clone(),
                conn_id,
                info,
            },
            queue: Some(tx),
        })
        .await
        .is_err()
    {
        return;
    }
    // Writer: everything the core wants this client to get, in order.
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let r = match out {
                Outbound::Msg(m) => frame::write(&mut send, &m).await,
                Outbound::Frames(frames) => {
                    let mut r = Ok(());
                    for f in frames.iter() {
                        if let Err(e) = send.write_all(f).await {
                            r = Err(FrameError::Io(e.into()));
                            break;
                        }
                    }
                    r
                }
            };
            if r.is_err() {
                break;
            }
        }
        send
    });
    // Reader: frames from the client, passed to the core.
    let reason = loop {
        let frame = read_body(&mut recv).await;
        let msg = match frame.and_then(|body| frame::decode::<ClientMsg>(&body)) {
            Ok(m) => m,
            Err(FrameError::Closed) => break "closed".to_string(),
            Err(e) => {
                tracing::warn!(%client, error = %e, "bad frame; closing session");
                // Malformed and oversized frames get an answer; a broken stream gets none.
                if let Some(msg) = frame_error_reply(&e) {
                    let say = Input::Say {
                        client: client.clone(),
                        conn_id,
                        msg,
                    };
                    let _ = ctx.core.send(say.into()).await;
                }
                break e.to_string();
            }
        };
        let ev = match msg {
            ClientMsg::Scores {
                round,
                scores,
                last,
            } => Input::Scores {
                client: client.clone(),
                round,
                scores,
                last,
            },
            ClientMsg::Report {
                round,
                local_accuracy,
            } => Input::Report {
                client: client.clone(),
                round,
                local_accuracy,
            },
            ClientMsg::Abandon { round } => Input::Abandon {
                client: client.clone(),
                conn_id,
                round,
            },
            ClientMsg::Hello { .. } | ClientMsg::Enroll { .. } => {
                let m = err(
                    ErrorCode::Malformed,
                    "Hello/Enroll are only valid at the start of a session",
                );
                Input::Say {
                    client: client.clone(),
                    conn_id,
                    msg: m,
                }
            }
        };
        if ctx.core.send(ev.into()).await.is_err() {
            break "coordinator shutting down".to_string();
        }
    };
    tracing::info!(%client, %reason, "session ended");
    let _ = ctx
        .core
        .send(
            Input::Disconnected {
                client: client.clone(),
                conn_id,
            }
            .into(),
        )
        .await;
    // The core drops our sender on Disconnected: the writer drains what is queued (an
    // error reply, say) and ends; then close.
    if let Ok(Ok(mut send)) = tokio::time::timeout(Duration::from_secs(2), writer).await {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(0u32.into(), b"bye");
}
