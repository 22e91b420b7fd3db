//! Client revocation: an operator withdraws a client's certificate, and its next connection is
//! refused with the reason. One file per revoked client in `<data_dir>/revoked/`, like the
//! enrollment tokens, so `crosslm-coordinator revoke` works while the daemon runs (the daemon
//! holds its database's lock) and the list survives restarts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Why and when a client was revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The client id (`client-` and 12 hex digits, as enrollment names it).
    pub client_id: String,
    /// The operator's reason, shown to the client.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub revoked_at_ms: u64,
}

/// The revocation list of a data dir.
#[derive(Debug, Clone)]
pub struct Revoked {
    dir: PathBuf,
}

impl Revoked {
    /// The list in `data_dir/revoked` (created on the first revocation).
    pub fn open(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("revoked"),
        }
    }

    /// Revokes `client_id`. Revoking twice keeps the first record.
    pub fn revoke(&self, client_id: &str, reason: &str, now_ms: u64) -> Result<Revocation> {
        let path = self.path(client_id)?;
        if let Some(r) = self.get(client_id)? {
            return Ok(r);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::File {
            path: self.dir.clone(),
            source,
        })?;
        let rec = Revocation {
            client_id: client_id.to_string(),
            reason: reason.to_string(),
            revoked_at_ms: now_ms,
        };
        let text = serde_json::to_string(&rec).map_err(|e| Error::Store(e.to_string()))?;
        // Write then rename: a daemon reading at the same moment sees all or nothing.
        let tmp = self.dir.join(format!(".{client_id}.tmp"));
        std::fs::write(&tmp, text).map_err(|source| Error::File {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::File { path, source })?;
        Ok(rec)
    }

    /// Lifts a revocation; false if the client was not revoked.
    pub fn restore(&self, client_id: &str) -> Result<bool> {
        let path = self.path(client_id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::File { path, source }),
        }
    }

    /// The revocation of `client_id`, if any. A record that cannot be read still revokes
    /// (with an unknown reason): failing open would let a revoked client back in.
    pub fn get(&self, client_id: &str) -> Result<Option<Revocation>> {
        let path = self.path(client_id)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).unwrap_or(Revocation {
                client_id: client_id.to_string(),
                reason: "(unreadable revocation record)".into(),
                revoked_at_ms: 0,
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::File { path, source }),
        }
    }

    /// Every revocation, by client id.
    pub fn list(&self) -> Result<Vec<Revocation>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::File {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if valid_id(&name)
                && let Some(r) = self.get(&name)?
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(out)
    }

    fn path(&self, client_id: &str) -> Result<PathBuf> {
        if !valid_id(client_id) {
            return Err(Error::Enroll(format!(
                "{client_id:?} is not a client id (client- and 12 hex digits; \
                 `crosslm-coordinator status` lists them)"
            )));
        }
        Ok(self.dir.join(client_id))
    }
}

/// `client-` and 12 lowercase hex digits: what enrollment mints, and safe as a file name.
fn valid_id(id: &str) -> bool {
    id.strip_prefix("client-").is_some_and(|h| {
        h.len() == 12
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_persist_and_can_be_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let list = Revoked::open(dir.path());
        assert_eq!(list.get("client-0123456789ab").unwrap(), None);
        let r = list.revoke("client-0123456789ab", "lost phone", 7).unwrap();
        assert_eq!(r.reason, "lost phone");
        // A second revocation keeps the first record; a fresh handle sees it (restart).
        list.revoke("client-0123456789ab", "again", 9).unwrap();
        let again = Revoked::open(dir.path());
        assert_eq!(again.get("client-0123456789ab").unwrap(), Some(r.clone()));
        assert_eq!(again.list().unwrap(), vec![r]);
        assert!(again.restore("client-0123456789ab").unwrap());
        assert!(!again.restore("client-0123456789ab").unwrap());
        assert_eq!(again.get("client-0123456789ab").unwrap(), None);
    }

    #[test]
    fn ids_are_checked_before_touching_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let list = Revoked::open(dir.path());
        for bad in ["../state.redb", "client-XYZ", "client-0123456789abc", ""] {
            let e = list.revoke(bad, "x", 0).unwrap_err().to_string();
            assert!(e.contains("not a client id"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_unreadable_record_still_revokes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("revoked")).unwrap();
        std::fs::write(dir.path().join("revoked/client-aaaaaaaaaaaa"), b"{garbage").unwrap();
        let r = Revoked::open(dir.path())
            .get("client-aaaaaaaaaaaa")
            .unwrap();
        assert!(r.unwrap().reason.contains("unreadable"));
    }
}
