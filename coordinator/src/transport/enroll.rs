//! One-time enrollment tokens, kept as files in `<data dir>/tokens/` so that the CLI can
//! mint tokens while the daemon runs (the database is locked by the daemon). A token is
//! consumed by an atomic rename into `tokens/used/`, so it works exactly once.

use std::path::{Path, PathBuf};

use crosslm_sdk::transport::EnrollToken;
use crosslm_sdk::transport::tls::fingerprint;
use rand::RngCore;

use crate::{Error, Result};

/// The token directory of a data dir.
pub struct Tokens {
    dir: PathBuf,
}

impl Tokens {
    /// Opens (creating) `data_dir/tokens`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("tokens");
        std::fs::create_dir_all(dir.join("used")).map_err(|source| Error::File {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Mints a new token pinned to the CA with fingerprint `ca_fingerprint`. Only a hash
    /// of the secret is stored.
    pub fn mint(&self, ca_fingerprint: &str) -> Result<EnrollToken> {
        let mut secret = [0u8; 16];
        rand::rng().fill_bytes(&mut secret);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.dir.join(fingerprint(secret.as_bytes()));
        std::fs::write(&path, b"").map_err(|source| Error::File { path, source })?;
        Ok(EnrollToken {
            secret,
            ca_fingerprint: ca_fingerprint.to_string(),
        })
    }

    /// Consumes a token. Fails if it is unknown or already used.
    pub fn consume(&self, secret: &str) -> Result<()> {
        let name = fingerprint(secret.as_bytes());
        std::fs::rename(self.dir.join(&name), self.dir.join("used").join(&name)).map_err(|_| {
            if self.dir.join("used").join(&name).exists() {
                Error::Enroll("token already used".into())
            } else {
                Error::Enroll("unknown token".into())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_work_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::open(dir.path()).unwrap();
        let tok = t.mint(&"ab".repeat(32)).unwrap();
        assert!(
            t.consume("deadbeef")
                .unwrap_err()
                .to_string()
                .contains("unknown")
        );
        t.consume(&tok.secret).unwrap();
        assert!(
            t.consume(&tok.secret)
                .unwrap_err()
                .to_string()
                .contains("already used")
        );
    }
}
