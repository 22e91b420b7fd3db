//! A client session: one QUIC connection, one bidirectional control stream of frames.

use std::net::SocketAddr;

use crate::error::SessionError;
use crate::privacy::ScorePrivacy;
use crate::protocol::{
    self, AggregatedScore, ClientInfo, ClientMsg, ErrorMsg, LearnSettings, PROTOCOL_VERSION,
    Reassembly, SampleScore, ServerMsg, SyntheticSample, TaskInfo, TooMany, frame,
};
use crate::transport::tls::{self, EnrollToken, Identity, SERVER_NAME};
use crate::{Error, Result};

/// Something that happened on a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A round opened and its whole batch arrived.
    Round {
        /// The round.
        round: u64,
        /// The task.
        task: TaskInfo,
        /// All samples of the batch.
        samples: Vec<SyntheticSample>,
        /// Deadline, ms since the Unix epoch.
        deadline_ms: u64,
        /// How to learn from the round's result (`None`: the client's defaults).
        learn: Option<LearnSettings>,
        /// The noise the coordinator asks for on the scores.
        privacy: Option<ScorePrivacy>,
    },
    /// Our scores for a round were accepted.
    Accepted {
        /// The round.
        round: u64,
    },
    /// A round finished; its aggregated scores arrived.
    Result {
        /// The round.
        round: u64,
        /// Aggregated scores of every sample.
        scores: Vec<AggregatedScore>,
    },
    /// A round failed.
    Failed {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The coordinator refused something we sent.
    Refused(ErrorMsg),
}

fn endpoint_for(server: SocketAddr) -> Result<quinn::Endpoint> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
        .map_err(|e| SessionError::Link(format!("cannot bind a UDP socket: {e}")).into())
}

async fn open(
    server: SocketAddr,
    cfg: quinn::ClientConfig,
) -> Result<(
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    let endpoint = endpoint_for(server)?;
    let conn = endpoint
        .connect_with(cfg, server, SERVER_NAME)
        .map_err(|e| connect_error(server, e))?
        .await
        .map_err(|e| connect_error(server, e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| {
        busy_reason(&e).unwrap_or_else(|| SessionError::Link(format!("open stream: {e}")))
    })?;
    Ok((endpoint, conn, send, recv))
}

/// The coordinator's reason, if it closed the connection as busy ([`protocol::CLOSE_BUSY`]).
fn busy_reason(e: &quinn::ConnectionError) -> Option<SessionError> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(protocol::CLOSE_BUSY) =>
        {
            Some(SessionError::Busy(
                String::from_utf8_lossy(&c.reason).into_owned(),
            ))
        }
        _ => None,
    }
}

/// Why an I/O error of a stream happened, when the connection under it was closed as busy.
fn busy_io(e: &std::io::Error) -> Option<SessionError> {
    let inner = e.get_ref()?;
    let lost = match (
        inner.downcast_ref::<quinn::ReadError>(),
        inner.downcast_ref::<quinn::WriteError>(),
    ) {
        (Some(quinn::ReadError::ConnectionLost(c)), _) => c,
        (_, Some(quinn::WriteError::ConnectionLost(c))) => c,
        _ => return None,
    };
    busy_reason(lost)
}

async fn send_msg(send: &mut quinn::SendStream, msg: &ClientMsg) -> Result<()> {
    frame::write(send, msg).await.map_err(|e| {
        match &e {
            protocol::FrameError::Io(io) => busy_io(io),
            _ => None,
        }
        .unwrap_or_else(|| SessionError::Link(format!("send: {e}")))
        .into()
    })
}

async fn recv_msg(recv: &mut quinn::RecvStream) -> Result<ServerMsg> {
    frame::read(recv).await.map_err(|e| match e {
        protocol::FrameError::Closed => SessionError::Closed.into(),
        protocol::FrameError::Io(e) => match busy_io(&e) {
            Some(busy) => busy.into(),
            // The coordinator closed the connection on purpose (its run is over): an end,
            // not a lost link to try again.
            None if closed_on_purpose(&e) => SessionError::Closed.into(),
            None => SessionError::Link(format!("receive: {e}")).into(),
        },
        e => Error::Protocol(format!("from the coordinator: {e}")),
    })
}

fn closed_on_purpose(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed
        ))
    )
}

fn connect_error(server: SocketAddr, e: impl std::fmt::Display) -> Error {
    SessionError::Connect {
        addr: server.to_string(),
        reason: e.to_string(),
    }
    .into()
}

async fn hello(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    info: ClientInfo,
) -> Result<Option<String>> {
    send_msg(send, &ClientMsg::hello(info)).await?;
    match recv_msg(recv).await? {
        ServerMsg::Welcome { version, client_id } if version == PROTOCOL_VERSION => Ok(client_id),
        ServerMsg::Welcome { version, .. } => Err(Error::Protocol(format!(
            "coordinator speaks protocol v{version}, this client v{PROTOCOL_VERSION}"
        ))),
        ServerMsg::Error(e) => Err(Error::Refused(e)),
        other => Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

/// Enrolls with a coordinator: trades a one-time token for a client certificate.
pub async fn enroll(server: SocketAddr, token: &EnrollToken, info: ClientInfo) -> Result<Identity> {
    let (key_der, csr_der) = tls::new_key_and_csr(&info.name)?;
    let (endpoint, conn, mut send, mut recv) = open(server, tls::enroll_config(token)?).await?;
    hello(&mut send, &mut recv, info).await?;
    send_msg(
        &mut send,
        &ClientMsg::Enroll {
            token: token.to_string(),
            csr_der,
        },
    )
    .await?;
    let reply = recv_msg(&mut recv).await;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    match reply? {
        ServerMsg::Enrolled {
            client_id,
            cert_der,
            ca_der,
        } => {
            if tls::fingerprint(&ca_der) != token.ca_fingerprint {
                return Err(Error::Enroll(
                    "coordinator sent a CA that does not match the token".into(),
                ));
            }
            Ok(Identity {
                client_id,
                cert_der,
                key_der,
                ca_der,
            })
        }
        ServerMsg::Error(e) => Err(Error::Refused(e)),
        other => Err(Error::Protocol(format!("expected Enrolled, got {other:?}"))),
    }
}

/// An open mutual-TLS session with the coordinator.
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    client_id: String,
}

impl Session {
    /// Connects with an enrolled identity and opens the session.
    pub async fn connect(
        server: SocketAddr,
        identity: &Identity,
        info: ClientInfo,
    ) -> Result<Self> {
        let (endpoint, conn, mut send, mut recv) =
            open(server, tls::session_config(identity)?).await?;
        let client_id = hello(&mut send, &mut recv, info).await?.ok_or_else(|| {
            Error::Protocol("coordinator did not recognise our certificate".into())
        })?;
        Ok(Self {
            endpoint,
            conn,
            send,
            recv,
            client_id,
        })
    }

    /// The id the coordinator knows us by.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Waits for the next event, assembling chunked batches and results.
    pub async fn next_event(&mut self) -> Result<Event> {
        match recv_msg(&mut self.recv).await? {
            ServerMsg::RoundOpen {
                round,
                task,
                total_samples,
                deadline_ms,
                learn,
                privacy,
            } => {
                if total_samples > protocol::MAX_ROUND_SAMPLES as u64 {
                    return Err(Error::Protocol(format!(
                        "round {round} announces {total_samples} samples, more than {}",
                        protocol::MAX_ROUND_SAMPLES
                    )));
                }
                let mut batch = Reassembly::new(round, total_samples as usize);
                let samples = loop {
                    match recv_msg(&mut self.recv).await? {
                        ServerMsg::Samples {
                            round: r,
                            samples: chunk,
                            last,
                        } if r == round => {
                            if let Some(all) = batch.push(chunk, last).map_err(too_many)? {
                                break all;
                            }
                        }
                        other => {
                            return Err(Error::Protocol(format!(
                                "expected samples of round {round}, got {other:?}"
                            )));
                        }
                    }
                };
                if samples.len() as u64 != total_samples {
                    return Err(Error::Protocol(format!(
                        "round {round} announced {total_samples} samples, got {}",
                        samples.len()
                    )));
                }
                Ok(Event::Round {
                    round,
                    task,
                    samples,
                    deadline_ms,
                    learn,
                    privacy,
                })
            }
            ServerMsg::RoundResult {
                round,
                scores,
                last,
            } => {
                let mut result = Reassembly::new(round, protocol::MAX_ROUND_SAMPLES);
                let mut next = (scores, last);
                let scores = loop {
                    if let Some(all) = result.push(next.0, next.1).map_err(too_many)? {
                        break all;
                    }
                    next = match recv_msg(&mut self.recv).await? {
                        ServerMsg::RoundResult {
                            round: r,
                            scores,
                            last,
                        } if r == round => (scores, last),
                        other => {
                            return Err(Error::Protocol(format!(
                                "expected results of round {round}, got {other:?}"
                            )));
                        }
                    };
                };
                Ok(Event::Result { round, scores })
            }
            ServerMsg::ScoresAccepted { round } => Ok(Event::Accepted { round }),
            ServerMsg::RoundFailed { round, reason } => Ok(Event::Failed { round, reason }),
            ServerMsg::Error(e) => Ok(Event::Refused(e)),
            other => Err(Error::Protocol(format!("unexpected message {other:?}"))),
        }
    }

    /// Sends scores for a round, streamed in chunks.
    pub async fn send_scores(&mut self, round: u64, scores: &[SampleScore]) -> Result<()> {
        for (chunk, last) in protocol::chunks(scores, protocol::SAMPLES_PER_CHUNK) {
            send_msg(
                &mut self.send,
                &ClientMsg::Scores {
                    round,
                    scores: chunk,
                    last,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Sends any message (used by tools and tests).
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        send_msg(&mut self.send, msg).await
    }

    /// Closes the session politely: what was sent (e.g. the last round's report) is
    /// delivered before the connection closes; closing at once would discard it.
    pub async fn close(mut self) {
        let _ = self.send.finish();
        // Resolves once the coordinator has read the stream to its end (or stopped it).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.send.stopped()).await;
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Pairs each sample with its row of label probabilities; a scorer that returned a different
/// number of rows is an error (the coordinator would refuse the reply anyway).
pub fn sample_scores(
    samples: &[SyntheticSample],
    probs: Vec<Vec<f32>>,
) -> Result<Vec<SampleScore>> {
    if probs.len() != samples.len() {
        return Err(Error::Model(format!(
            "scorer returned {} rows for {} samples",
            probs.len(),
            samples.len()
        )));
    }
    Ok(samples
        .iter()
        .zip(probs)
        .map(|(s, probs)| SampleScore { id: s.id, probs })
        .collect())
}

fn too_many(e: TooMany) -> Error {
    Error::Protocol(e.to_string())
}
