//! The coordinator's settings (the `[daemon]` part of the config file).

use std::net::SocketAddr;
use std::path::PathBuf;

use crosslm_sdk::method::LearnSchedule;
use crosslm_sdk::privacy::PrivacyTarget;
use serde::{Deserialize, Serialize};

use crate::round::RoundConfig;

/// Daemon settings (the `[daemon]` part of the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the CA, tokens and database live.
    pub data_dir: PathBuf,
    /// Stop after this many finished rounds (counting those of earlier runs); none = forever.
    pub rounds: Option<u64>,
    /// Synthetic samples per label per round.
    pub samples_per_label: usize,
    /// Connected clients needed before a round opens.
    pub min_clients: usize,
    /// Round settings.
    pub round: RoundConfig,
    /// Milliseconds of silence after which a client counts as gone.
    pub idle_timeout_ms: u64,
    /// After the last round, how long to wait for clients to report and leave.
    pub linger_ms: u64,
    /// How clients learn from each round's result, sent with the round (`[daemon.learning]`);
    /// none: each client's own defaults.
    pub learning: Option<LearnSchedule>,
    /// Differential privacy asked of every client's scores (`[daemon.privacy]`): the target
    /// sets the noise multiplier sent with each round; none: no noise asked.
    pub privacy: Option<PrivacyTarget>,
    /// Where the admin endpoint listens (health, status, metrics over HTTP; keep it on
    /// localhost); none: no endpoint.
    pub admin: Option<SocketAddr>,
    /// Connections without a client certificate (enrolling devices, or peers that have not
    /// proven anything) held at once; past it a new one is closed right after its handshake
    /// with the reason `busy` (the SDK reports it as worth trying again). Enrolled clients
    /// do not count against it, so a flood of anonymous peers cannot crowd them out.
    pub max_unauthenticated: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("crosslm-data"),
            rounds: None,
            samples_per_label: 32,
            min_clients: 1,
            round: RoundConfig::default(),
            idle_timeout_ms: 30_000,
            linger_ms: 120_000,
            learning: None,
            privacy: None,
            admin: None,
            max_unauthenticated: 1_024,
        }
    }
}
