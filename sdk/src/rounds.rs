//! The client's round loop, the one every client runs (the desktop binary and the mobile
//! bindings through [`crate::client::Client`], the experiment runner, the tests): score each
//! batch with a [`Scorer`], send the scores, learn from each result with the round's
//! [`LearnSettings`], report the local accuracy. [`RoundHooks`] let the caller show progress
//! and persist state; a watch channel cancels between steps.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;

use crate::privacy::{self, ScorePrivacy};
use crate::protocol::{AggregatedScore, ClientMsg, LearnSettings, SyntheticSample, TaskInfo};
use crate::transport::{Event, Session, sample_scores};
use crate::{Error, Result};

/// The client-side seam of a round, in the spirit of Flower's client (`evaluate`, `fit`): an
/// SLM (or anything) that judges synthetic samples and learns from a round's result.
pub trait Scorer: Send + 'static {
    /// For each sample, the probability of every label of `task` (each row sums to 1).
    fn score(&mut self, task: &TaskInfo, samples: &[SyntheticSample]) -> Result<Vec<Vec<f32>>>;

    /// Called with a finished round's aggregated scores and the settings the coordinator sent
    /// with the round (`None`: the scorer's own defaults). Returns the local test accuracy to
    /// report, if the client measured one.
    fn learn(
        &mut self,
        _task: &TaskInfo,
        _samples: &[SyntheticSample],
        _scores: &[AggregatedScore],
        _settings: Option<&LearnSettings>,
    ) -> Result<Option<f32>> {
        Ok(None)
    }
}

/// What the loop tells its caller; every method has a no-op default.
pub trait RoundHooks: Send {
    /// `done` of `total` samples of `round` scored.
    fn scoring(&mut self, _round: u64, _task: &TaskInfo, _done: usize, _total: usize) {}
    /// The scores of `round` were sent.
    fn scored(&mut self, _round: u64) {}
    /// A round's result arrived (whether or not we scored it).
    fn result(&mut self, _round: u64) {}
    /// Learning from `round`'s result begins.
    fn learning(&mut self, _round: u64) {}
    /// Learned from `round`'s result (before the report is sent): persist here. An error ends
    /// the loop.
    fn learned(&mut self, _round: u64, _accuracy: Option<f32>) -> Result<()> {
        Ok(())
    }
    /// `round` failed at the coordinator.
    fn failed(&mut self, _round: u64, _reason: &str) {}
    /// Whether to sit `round` out (the client is paused): it is neither scored nor learned
    /// from.
    fn skip(&mut self, _round: u64) -> bool {
        false
    }
    /// The noise multiplier `round`'s scores go out with when the coordinator asks for
    /// `requested` (`None`: no noise), or why the client will not score the round (its
    /// privacy budget, say: the round is then abandoned). Called before scoring; the default
    /// applies what the coordinator asks.
    fn privacy(
        &mut self,
        _round: u64,
        requested: Option<ScorePrivacy>,
    ) -> std::result::Result<Option<f64>, String> {
        Ok(requested.map(|p| p.noise_multiplier).filter(|&z| z > 0.0))
    }
    /// Where `round`'s noise is drawn from: the OS's randomness unless a caller fixes a seed
    /// (experiments).
    fn noise_rng(&mut self, _round: u64) -> StdRng {
        StdRng::from_os_rng()
    }
}

/// Hooks that do nothing.
pub struct NoHooks;

impl RoundHooks for NoHooks {}

/// Samples scored per call of [`Scorer::score`]: progress and cancellation between calls.
const SCORE_CHUNK: usize = 32;

/// Why [`run_rounds`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundsDone {
    /// Round results received.
    pub results: u64,
    /// The loop stopped on the cancel signal.
    pub cancelled: bool,
}

/// Takes part in rounds until `limit` results were received (forever with `None`) or `cancel`
/// turns true. The scorer stays in `scorer` between steps; it is lost (`None`) only when a
/// worker thread panicked.
pub async fn run_rounds<S: Scorer>(
    session: &mut Session,
    scorer: &mut Option<S>,
    limit: Option<u64>,
    hooks: &mut dyn RoundHooks,
    mut cancel: Option<watch::Receiver<bool>>,
) -> Result<RoundsDone> {
    type Batch = (TaskInfo, Vec<SyntheticSample>, Option<LearnSettings>);
    let mut done = RoundsDone {
        results: 0,
        cancelled: false,
    };
    let mut batches: HashMap<u64, Batch> = HashMap::new();
    while limit.is_none_or(|r| done.results < r) {
        let event = match cancel.as_mut() {
            Some(rx) => tokio::select! {
                biased;
                _ = cancelled(rx) => {
                    done.cancelled = true;
                    break;
                }
                e = session.next_event() => e?,
            },
            None => session.next_event().await?,
        };
        match event {
            Event::Round {
                round,
                task,
                samples,
                learn,
                privacy: requested,
                ..
            } => {
                if hooks.skip(round) {
                    tracing::info!(round, "paused: sitting this round out");
                    continue;
                }
                let noise = match hooks.privacy(round, requested) {
                    Ok(noise) => noise,
                    Err(reason) => {
                        tracing::warn!(round, %reason, "not scoring this round");
                        hooks.failed(round, &reason);
                        if let Err(e) = session.send(&ClientMsg::Abandon { round }).await {
                            tracing::warn!(round, error = %e, "could not abandon the round");
                        }
                        continue;
                    }
                };
                tracing::info!(round, samples = samples.len(), "scoring batch");
                let mut probs = Vec::with_capacity(samples.len());
                hooks.scoring(round, &task, 0, samples.len());
                for start in (0..samples.len()).step_by(SCORE_CHUNK) {
                    if cancel.as_ref().is_some_and(|rx| *rx.borrow()) {
                        tracing::info!(round, "cancelled: abandoned the reply to this round");
                        done.cancelled = true;
                        return Ok(done);
                    }
                    let chunk = samples[start..(start + SCORE_CHUNK).min(samples.len())].to_vec();
                    let task_c = task.clone();
                    let n = chunk.len();
                    let rows = on_worker(scorer, move |sc| sc.score(&task_c, &chunk)).await??;
                    if rows.len() != n {
                        return Err(Error::Model(format!(
                            "scorer returned {} rows for {n} samples",
                            rows.len()
                        )));
                    }
                    probs.extend(rows);
                    hooks.scoring(round, &task, probs.len(), samples.len());
                }
                if let Some(z) = noise {
                    let mut rng = hooks.noise_rng(round);
                    privacy::privatize(&mut probs, z, &mut rng);
                    let sigma = privacy::noise_std(probs.len(), z);
                    tracing::info!(round, noise_multiplier = z, sigma, "scores privatized");
                }
                session
                    .send_scores(round, &sample_scores(&samples, probs)?)
                    .await?;
                hooks.scored(round);
                batches.insert(round, (task, samples, learn));
            }
            Event::Accepted { round } => tracing::info!(round, "scores accepted"),
            Event::Result { round, scores } => {
                done.results += 1;
                hooks.result(round);
                let Some((task, samples, learn)) = batches.remove(&round) else {
                    tracing::info!(round, "round finished (we did not score it)");
                    continue;
                };
                hooks.learning(round);
                // Not cancellable: a checkpoint is written at its end, and a cancel meanwhile
                // takes effect right after.
                let acc = on_worker(scorer, move |sc| {
                    sc.learn(&task, &samples, &scores, learn.as_ref())
                })
                .await??;
                hooks.learned(round, acc)?;
                // A report is informational: a coordinator that already left loses nothing.
                let report = ClientMsg::Report {
                    round,
                    local_accuracy: acc,
                };
                if let Err(e) = session.send(&report).await {
                    tracing::warn!(round, error = %e, "could not report local accuracy");
                }
                tracing::info!(round, ?acc, "round finished");
            }
            Event::Failed { round, reason } => {
                batches.remove(&round);
                tracing::warn!(round, %reason, "round failed");
                hooks.failed(round, &reason);
            }
            Event::Refused(e) => return Err(Error::Refused(e)),
        }
    }
    Ok(done)
}

/// [`run_rounds`] without hooks or cancellation: returns the scorer and the number of
/// results received.
pub async fn participate<S: Scorer>(
    session: &mut Session,
    scorer: S,
    limit: Option<u64>,
) -> Result<(S, u64)> {
    let mut slot = Some(scorer);
    let done = run_rounds(session, &mut slot, limit, &mut NoHooks, None).await?;
    let scorer = slot.ok_or_else(|| Error::Internal("the scorer was lost".into()))?;
    Ok((scorer, done.results))
}

/// Runs `f` on the scorer in a blocking thread (models are not `Sync`) and puts it back.
async fn on_worker<S: Scorer, T: Send + 'static>(
    scorer: &mut Option<S>,
    f: impl FnOnce(&mut S) -> T + Send + 'static,
) -> Result<T> {
    let mut sc = scorer
        .take()
        .ok_or_else(|| Error::Internal("the scorer was lost in an earlier failure".into()))?;
    let (sc, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut sc);
        (sc, out)
    })
    .await
    .map_err(|e| Error::Internal(format!("worker thread failed: {e}")))?;
    *scorer = Some(sc);
    Ok(out)
}

/// Resolves when `rx` says cancelled; never when the sender is gone.
pub(crate) async fn cancelled(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
