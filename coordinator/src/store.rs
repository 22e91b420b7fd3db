//! Durable coordinator state in an embedded database (redb) in the data dir.
//!
//! Every reply is committed before the client is told it was accepted, and a round's
//! result is committed in the same transaction that closes it, so a `kill -9` at any point
//! loses nothing that was acknowledged.

use std::path::Path;

use crosslm_sdk::protocol::{ClientId, ClientInfo, SyntheticSample, TaskInfo};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::round::{Phase, Reply, RoundConfig, RoundOutcome};
use crate::tuning::LlmReport;
use crate::{Error, Result};

const CLIENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("clients");
const CERTS: TableDefinition<&str, &str> = TableDefinition::new("certs");
const ROUNDS: TableDefinition<u64, &[u8]> = TableDefinition::new("rounds");
const REPLIES: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("replies");
const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
const REPORTS: TableDefinition<(u64, &str), f32> = TableDefinition::new("reports");
/// The LLM's figures per round (0 = before the first), JSON so fields can be added.
const LLM: TableDefinition<u64, &[u8]> = TableDefinition::new("llm");

/// An enrolled client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Its id.
    pub id: ClientId,
    /// SHA-256 of its certificate.
    pub cert_fingerprint: String,
    /// What it last said about itself.
    pub info: ClientInfo,
    /// Enrollment time, ms since the Unix epoch.
    pub enrolled_at: u64,
}

/// A round as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub id: u64,
    /// The task.
    pub task: TaskInfo,
    /// Its synthetic samples.
    pub samples: Vec<SyntheticSample>,
    /// Its settings.
    pub cfg: RoundConfig,
    /// Opening time, ms since the Unix epoch.
    pub opened_at: u64,
    /// Deadline, ms since the Unix epoch.
    pub deadline_at: u64,
    /// Where it stands.
    pub phase: Phase,
}

/// One line of `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The round.
    pub id: u64,
    /// Task name.
    pub task: String,
    /// Number of samples.
    pub samples: usize,
    /// Where it stands.
    pub phase: Phase,
    /// Clients whose scores were received.
    pub replies: Vec<ClientId>,
    /// Mean quality of the aggregated scores, once done.
    pub mean_quality: Option<f32>,
}

/// The coordinator's database.
pub struct Store {
    db: redb::Database,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(db_err)
}

fn dec<T: DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| Error::Store(format!("corrupt {what} record: {e}")))
}

impl Store {
    /// Opens (or creates) `dir/state.redb`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("state.redb");
        let db = redb::Database::create(&path)
            .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
        // Create every table so read transactions never meet a missing one.
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(CLIENTS).map_err(db_err)?;
            tx.open_table(CERTS).map_err(db_err)?;
            tx.open_table(ROUNDS).map_err(db_err)?;
            tx.open_table(REPLIES).map_err(db_err)?;
            tx.open_table(RESULTS).map_err(db_err)?;
            tx.open_table(REPORTS).map_err(db_err)?;
            tx.open_table(LLM).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Records a newly enrolled client.
    pub fn add_client(&self, rec: &ClientRecord) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(CLIENTS)
                .map_err(db_err)?
                .insert(rec.id.as_str(), enc(rec)?.as_slice())
                .map_err(db_err)?;
            tx.open_table(CERTS)
                .map_err(db_err)?
                .insert(rec.cert_fingerprint.as_str(), rec.id.as_str())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Updates what a client says about itself.
    pub fn update_client_info(&self, id: &str, info: &ClientInfo) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(CLIENTS).map_err(db_err)?;
            let rec = t
                .get(id)
                .map_err(db_err)?
                .map(|v| dec::<ClientRecord>(v.value(), "client"));
            if let Some(rec) = rec {
                let mut rec = rec?;
                rec.info = info.clone();
                t.insert(id, enc(&rec)?.as_slice()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// The client holding a certificate, by its fingerprint.
    pub fn client_by_cert(&self, fingerprint: &str) -> Result<Option<ClientRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let Some(id) = tx
            .open_table(CERTS)
            .map_err(db_err)?
            .get(fingerprint)
            .map_err(db_err)?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let clients = tx.open_table(CLIENTS).map_err(db_err)?;
        let rec = clients.get(id.as_str()).map_err(db_err)?;
        rec.map(|v| dec(v.value(), "client")).transpose()
    }

    /// Every enrolled client.
    pub fn clients(&self) -> Result<Vec<ClientRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(CLIENTS).map_err(db_err)?;
        t.iter()
            .map_err(db_err)?
            .map(|e| {
                let (_, v) = e.map_err(db_err)?;
                dec(v.value(), "client")
            })
            .collect()
    }

    /// Id for the next round.
    pub fn next_round_id(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(ROUNDS).map_err(db_err)?;
        let last = t.last().map_err(db_err)?.map(|(k, _)| k.value());
        Ok(last.map_or(1, |k| k + 1))
    }

    /// Writes a round record.
    pub fn put_round(&self, rec: &RoundRecord) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(ROUNDS)
            .map_err(db_err)?
            .insert(rec.id, enc(rec)?.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// A round record.
    pub fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(ROUNDS).map_err(db_err)?;
        let v = t.get(id).map_err(db_err)?;
        v.map(|v| dec(v.value(), "round")).transpose()
    }

    /// The latest round if it is still collecting (what to resume after a restart).
    pub fn unfinished_round(&self) -> Result<Option<RoundRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(ROUNDS).map_err(db_err)?;
        let Some((_, v)) = t.last().map_err(db_err)? else {
            return Ok(None);
        };
        let rec: RoundRecord = dec(v.value(), "round")?;
        Ok(matches!(rec.phase, Phase::Open | Phase::Collecting).then_some(rec))
    }

    /// Commits an accepted reply.
    pub fn put_reply(&self, round: u64, client: &str, reply: &Reply) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(REPLIES)
            .map_err(db_err)?
            .insert((round, client), enc(reply)?.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Every reply of a round.
    pub fn replies(&self, round: u64) -> Result<Vec<(ClientId, Reply)>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(REPLIES).map_err(db_err)?;
        let range = t.range((round, "")..(round + 1, "")).map_err(db_err)?;
        range
            .map(|e| {
                let (k, v) = e.map_err(db_err)?;
                Ok((k.value().1.to_string(), dec(v.value(), "reply")?))
            })
            .collect()
    }

    /// Closes a round: its final phase and (when done) its result, in one transaction.
    pub fn finish_round(
        &self,
        round: u64,
        phase: Phase,
        outcome: Option<&RoundOutcome>,
    ) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut rounds = tx.open_table(ROUNDS).map_err(db_err)?;
            let rec = rounds
                .get(round)
                .map_err(db_err)?
                .map(|v| dec::<RoundRecord>(v.value(), "round"));
            let mut rec = rec.ok_or_else(|| Error::Store(format!("no round {round}")))??;
            rec.phase = phase;
            rounds
                .insert(round, enc(&rec)?.as_slice())
                .map_err(db_err)?;
            if let Some(o) = outcome {
                tx.open_table(RESULTS)
                    .map_err(db_err)?
                    .insert(round, enc(o)?.as_slice())
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// A finished round's result.
    pub fn result(&self, round: u64) -> Result<Option<RoundOutcome>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(RESULTS).map_err(db_err)?;
        let v = t.get(round).map_err(db_err)?;
        v.map(|v| dec(v.value(), "result")).transpose()
    }

    /// Records a client's local accuracy after a round.
    pub fn put_report(&self, round: u64, client: &str, accuracy: f32) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(REPORTS)
            .map_err(db_err)?
            .insert((round, client), accuracy)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Local accuracies reported for a round.
    pub fn reports(&self, round: u64) -> Result<Vec<(ClientId, f32)>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(REPORTS).map_err(db_err)?;
        let range = t.range((round, "")..(round + 1, "")).map_err(db_err)?;
        range
            .map(|e| {
                let (k, v) = e.map_err(db_err)?;
                Ok((k.value().1.to_string(), v.value()))
            })
            .collect()
    }

    /// Records the LLM's figures after `report.round` (0: before any round).
    pub fn put_llm_report(&self, report: &LlmReport) -> Result<()> {
        let bytes = serde_json::to_vec(report).map_err(db_err)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(LLM)
            .map_err(db_err)?
            .insert(report.round, bytes.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Every LLM report, by round.
    pub fn llm_reports(&self) -> Result<Vec<LlmReport>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(LLM).map_err(db_err)?;
        t.iter()
            .map_err(db_err)?
            .map(|e| {
                let (_, v) = e.map_err(db_err)?;
                serde_json::from_slice(v.value())
                    .map_err(|e| Error::Store(format!("corrupt LLM report: {e}")))
            })
            .collect()
    }

    /// The id of the newest finished round with a result, if any.
    pub fn last_done_round(&self) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(RESULTS).map_err(db_err)?;
        let last = t.last().map_err(db_err)?;
        Ok(last.map(|(k, _)| k.value()))
    }

    /// A summary of every round, oldest first.
    pub fn summaries(&self) -> Result<Vec<RoundSummary>> {
        let ids: Vec<u64> = {
            let tx = self.db.begin_read().map_err(db_err)?;
            let t = tx.open_table(ROUNDS).map_err(db_err)?;
            t.iter()
                .map_err(db_err)?
                .map(|e| e.map(|(k, _)| k.value()).map_err(db_err))
                .collect::<Result<_>>()?
        };
        ids.into_iter()
            .filter_map(|id| self.round(id).transpose())
            .map(|rec| {
                let rec = rec?;
                let replies = self.replies(rec.id)?.into_iter().map(|(c, _)| c).collect();
                let mean_quality = self
                    .result(rec.id)?
                    .filter(|o| !o.scores.is_empty())
                    .map(|o| {
                        o.scores.iter().map(|s| s.quality).sum::<f32>() / o.scores.len() as f32
                    });
                Ok(RoundSummary {
                    id: rec.id,
                    task: rec.task.name,
                    samples: rec.samples.len(),
                    phase: rec.phase,
                    replies,
                    mean_quality,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crosslm_sdk::protocol::SampleScore;

    fn rec(id: u64) -> RoundRecord {
        RoundRecord {
            id,
            task: TaskInfo {
                name: "t".into(),
                description: String::new(),
                labels: vec!["a".into(), "b".into()],
            },
            samples: vec![SyntheticSample {
                id: 1,
                text: "x".into(),
                label: 0,
            }],
            cfg: RoundConfig::default(),
            opened_at: 0,
            deadline_at: 10,
            phase: Phase::Collecting,
        }
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.next_round_id().unwrap(), 1);
            let c = ClientRecord {
                id: "c1".into(),
                cert_fingerprint: "fp".into(),
                info: ClientInfo {
                    name: "n".into(),
                    slm_arch: "minilm".into(),
                    n_private: 5,
                },
                enrolled_at: 1,
            };
            s.add_client(&c).unwrap();
            s.put_round(&rec(1)).unwrap();
            let reply = Reply {
                weight: 5.0,
                scores: vec![SampleScore {
                    id: 1,
                    probs: vec![0.5, 0.5],
                }],
            };
            s.put_reply(1, "c1", &reply).unwrap();
            s.put_reply(2, "c9", &reply).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.client_by_cert("fp").unwrap().unwrap().id, "c1");
        assert!(s.client_by_cert("nope").unwrap().is_none());
        assert_eq!(s.unfinished_round().unwrap().unwrap().id, 1);
        assert_eq!(
            s.replies(1).unwrap().len(),
            1,
            "range scan stays within the round"
        );
        assert_eq!(s.next_round_id().unwrap(), 2);
        s.finish_round(1, Phase::Done, None).unwrap();
        assert!(s.unfinished_round().unwrap().is_none());
        assert_eq!(s.summaries().unwrap().len(), 1);
        let mut r = LlmReport::new(0);
        r.task_accuracy = Some(0.5);
        s.put_llm_report(&r).unwrap();
        r.round = 1;
        s.put_llm_report(&r).unwrap();
        let got = s.llm_reports().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], r);
    }
}
