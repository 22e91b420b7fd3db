//! The client's TOML config file and the flags shared by `enroll`, `join` and `status`:
//! flags override the file, the file overrides the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use crosslm_sdk::client::ClientConfig;
use crosslm_sdk::privacy::PrivacyFloor;
use crosslm_sdk::slm::{Arch, Backend};
use crosslm_sdk::transport::Reconnect;
use serde::Deserialize;

/// The config file (see `client.example.toml`). Relative paths are relative to the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Coordinator `host:port`.
    pub coordinator: Option<String>,
    /// Data dir.
    pub data_dir: Option<PathBuf>,
    /// Device name.
    pub name: Option<String>,
    /// Architecture of a fresh model.
    pub arch: Option<Arch>,
    /// Compute backend.
    pub backend: Option<Backend>,
    /// Pretrained MiniLM directory.
    pub model_dir: Option<PathBuf>,
    /// Checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// Private labeled data.
    pub data: Option<PathBuf>,
    /// Local test data.
    pub test: Option<PathBuf>,
    /// Held-out fraction of `data` when there is no `test`.
    pub test_fraction: Option<f64>,
    /// Epochs of the first local training.
    pub train_epochs: Option<usize>,
    /// Epochs of the training after each round.
    pub round_epochs: Option<usize>,
    /// Minimum quality of a synthetic sample to train on (the intended label's share against
    /// its strongest rival: the aggregated quality with two labels).
    pub min_quality: Option<f32>,
    /// Train toward the aggregated soft labels instead of the intended labels.
    pub soft_targets: Option<bool>,
    /// Aggregation weight announced to the coordinator.
    pub n_private: Option<u64>,
    /// Connection timeout, ms.
    pub connect_timeout_ms: Option<u64>,
    /// Tries to reconnect after a lost link before `join` gives up (0: none).
    pub reconnect_attempts: Option<u32>,
    /// Seed of the test split and training.
    pub seed: Option<u64>,
    /// Most threads for training and scoring (default: every core).
    pub threads: Option<usize>,
    /// This client's privacy terms for its scores (`[privacy]`).
    pub privacy: Option<PrivacyFloor>,
}

impl FileConfig {
    /// Reads a config file, making its relative paths relative to it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut cfg: FileConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.model_dir,
            &mut cfg.checkpoint,
            &mut cfg.data,
            &mut cfg.test,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }
}

/// Flags every client command takes.
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Config file (TOML); flags override it.
    #[arg(short, long, env = "CROSSLM_CLIENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator address (host:port, UDP); after enrollment the enrolled one is the default.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Where this client keeps its identity, checkpoint and state
    /// [default: crosslm-client-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Name of this device, as the coordinator logs it [default: desktop].
    #[arg(long)]
    pub name: Option<String>,
    /// Connection timeout in ms [default: 10000].
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
}

impl CommonArgs {
    /// The file config (empty without `--config`).
    pub fn file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(p) => FileConfig::load(p),
            None => Ok(FileConfig::default()),
        }
    }

    /// The client configuration from the defaults, the file, then these flags.
    pub fn client_config(&self, file: &FileConfig) -> ClientConfig {
        let d = ClientConfig::default();
        ClientConfig {
            coordinator: self.coordinator.clone().or(file.coordinator.clone()),
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("crosslm-client-data")),
            name: self
                .name
                .clone()
                .or(file.name.clone())
                .unwrap_or_else(|| "desktop".into()),
            arch: file.arch.unwrap_or(d.arch),
            backend: file.backend.unwrap_or(d.backend),
            model_dir: file.model_dir.clone().unwrap_or(d.model_dir),
            checkpoint_dir: file.checkpoint.clone(),
            train_epochs: file.train_epochs,
            round_epochs: file.round_epochs.or(d.round_epochs),
            test_fraction: file.test_fraction.unwrap_or(d.test_fraction),
            min_quality: file.min_quality.unwrap_or(d.min_quality),
            soft_targets: file.soft_targets.unwrap_or(d.soft_targets),
            n_private: file.n_private,
            connect_timeout: self
                .connect_timeout_ms
                .or(file.connect_timeout_ms)
                .map(Duration::from_millis)
                .unwrap_or(d.connect_timeout),
            seed: file.seed.unwrap_or(d.seed),
            threads: file.threads,
            reconnect: Reconnect {
                attempts: file.reconnect_attempts.unwrap_or(d.reconnect.attempts),
                ..d.reconnect
            },
            privacy: file.privacy.unwrap_or(d.privacy),
            ..d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(&p, include_str!("client.example.toml")).unwrap();
        let f = FileConfig::load(&p).unwrap();
        assert_eq!(f.arch, Some(Arch::Bag));
        assert_eq!(f.data_dir, Some(dir.path().join("client-data")));
        let common = CommonArgs {
            config: Some(p),
            coordinator: Some("10.0.0.1:9".into()),
            data_dir: None,
            name: None,
            connect_timeout_ms: None,
        };
        let c = common.client_config(&f);
        assert_eq!(c.coordinator.as_deref(), Some("10.0.0.1:9"), "flag wins");
        assert_eq!(c.name, "laptop", "file wins over the default");
        assert_eq!(c.privacy.min_noise_multiplier, 0.5);
        assert_eq!(c.privacy.epsilon_budget, Some(8.0));
        assert_eq!(c.reconnect.attempts, 8);
        std::fs::write(dir.path().join("bad.toml"), "nonsense = 1\n").unwrap();
        let e = FileConfig::load(&dir.path().join("bad.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("nonsense"), "{e:#}");
    }
}
