//! The client's learning: [`Client::train`] on the private data, and [`Client::join`], which
//! takes part in rounds through the SDK's one round loop ([`crate::rounds::run_rounds`]) with
//! hooks that report progress and keep the checkpoint and state files.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{Activity, Client, JoinSummary, Progress, TrainSummary, lock};
use crate::data::Dataset;
use crate::participant::{Learning, SlmScorer};
use crate::privacy::ScorePrivacy;
use crate::protocol::{ClientInfo, LearnSettings, TaskInfo};
use crate::rounds::{RoundHooks, cancelled, run_rounds};
use crate::slm::checkpoint::swap;
use crate::slm::{self, Backend, Slm, TrainConfig, TrainExample, TrainProgress};
use crate::transport::backoff::Backoff;
use crate::transport::{Identity, Session};
use crate::{Error, Result};

/// Below this many private examples there is no validation split: every example trains.
const MIN_FOR_VALIDATION: usize = 200;

impl Client {
    /// The in-memory model, else the checkpoint, else `None`. Loading is slow: call it from a
    /// blocking thread.
    fn take_model(
        model: Option<Box<dyn Slm>>,
        dir: &Path,
        backend: Backend,
    ) -> Result<Option<Box<dyn Slm>>> {
        match model {
            Some(m) => Ok(Some(m)),
            None if swap::is_checkpoint(dir) => Ok(Some(slm::load_checkpoint(dir, backend)?)),
            None => Ok(None),
        }
    }

    /// Trains the SLM on the loaded private data (a fresh model of the configured
    /// architecture when there is no checkpoint yet), saves the checkpoint and measures the
    /// local accuracy. Reports [`Activity::Training`] per optimizer step.
    pub async fn train(&self) -> Result<TrainSummary> {
        let _op = self.begin("train")?;
        let (private, test) = {
            let data = lock(&self.data);
            (data.private.clone(), data.test.clone())
        };
        let private = private.ok_or_else(|| {
            Error::NotReady("no private data: load a data file or rows first".into())
        })?;
        let loaded = lock(&self.model).take();
        let cfg = self.config.clone();
        let dir = self.checkpoint_dir();
        let reporter = self.reporter.clone();
        let cancel = self.cancel.subscribe();
        let pool = self.pool.clone();
        let (model, result) = blocking(move || {
            let work = || {
                let mut model = None;
                let r = (|| -> Result<TrainSummary> {
                    let mut slm = match Self::take_model(loaded, &dir, cfg.backend)? {
                        Some(m) => m,
                        None => slm::new_slm(
                            cfg.arch,
                            &cfg.model_dir,
                            private.label_names.clone(),
                            cfg.max_len,
                            cfg.backend,
                        )?,
                    };
                    if slm.labels() != private.label_names.as_slice() {
                        let labels = slm.labels().to_vec();
                        model = Some(slm);
                        return Err(Error::Data(format!(
                            "the data's labels {:?} differ from the model's {labels:?}",
                            private.label_names
                        )));
                    }
                    let mut train = TrainConfig::for_arch(slm.arch());
                    if let Some(e) = cfg.train_epochs {
                        train.epochs = e;
                    }
                    if private.len() < MIN_FOR_VALIDATION {
                        train.validation_fraction = 0.0;
                    }
                    train.seed = cfg.seed;
                    let examples = hard_examples(&private);
                    if *cancel.borrow() {
                        model = Some(slm);
                        return Err(Error::Cancelled);
                    }
                    reporter.report(
                        Activity::Training,
                        0,
                        0,
                        format!("training {} on {} examples", slm.arch(), examples.len()),
                    );
                    let report = slm.train(&examples, &train, &mut |p| {
                        reporter.emit(Progress {
                            activity: Activity::Training,
                            round: None,
                            done: p.step as u64,
                            total: p.total_steps as u64,
                            loss: Some(p.loss),
                            accuracy: None,
                            message: format!("epoch {}/{}", p.epoch, p.epochs),
                        })
                    });
                    let report = match report {
                        Ok(r) => r,
                        Err(e) => {
                            model = Some(slm);
                            return Err(e);
                        }
                    };
                    let saved = swap::save(slm.as_ref(), &dir);
                    let acc = test_accuracy(slm.as_ref(), test.as_ref());
                    model = Some(slm);
                    saved?;
                    Ok(TrainSummary {
                        epochs: report.epochs_run as u64,
                        steps: report.steps as u64,
                        train_loss: report.train_loss,
                        local_accuracy: acc?,
                        seconds: report.train_seconds,
                        checkpoint: dir.clone(),
                    })
                })();
                // The model stays in memory for join, also after a failed training.
                (model, r)
            };
            match pool {
                Some(p) => p.install(work),
                None => work(),
            }
        })
        .await?;
        restore_model(&self.model, model);
        let summary = result?;
        self.update_state(|s| s.local_accuracy = summary.local_accuracy)?;
        self.reporter.emit(Progress {
            activity: Activity::Training,
            round: None,
            done: summary.steps,
            total: summary.steps,
            loss: Some(summary.train_loss),
            accuracy: summary.local_accuracy,
            message: "trained".into(),
        });
        Ok(summary)
    }

    /// Connects to the coordinator and takes part in rounds: score each batch, send the
    /// scores, and after each result train on it plus the private data (when loaded), save the
    /// checkpoint, report the local accuracy. Returns after `rounds` results, or when
    /// cancelled ([`JoinSummary::cancelled`]).
    pub async fn join(&self, rounds: Option<u64>) -> Result<JoinSummary> {
        let _op = self.begin("join")?;
        let identity = match Identity::load(&self.config.data_dir) {
            Ok(id) => id,
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotReady(
                    "not enrolled: enroll with a token from the coordinator first".into(),
                ));
            }
            Err(e) => return Err(e),
        };
        let (_, addr) = self.coordinator().await?;
        let dir = self.checkpoint_dir();
        let backend = self.config.backend;
        let model = lock(&self.model).take();
        let slm = blocking(move || Self::take_model(model, &dir, backend))
            .await??
            .ok_or_else(|| {
                Error::NotReady(
                    "no model: train on private data first (or point the checkpoint at a trained SLM)"
                        .into(),
                )
            })?;
        let labels = slm.labels().to_vec();
        let arch = slm.arch();
        let (private, test) = {
            let data = lock(&self.data);
            (data.private.clone(), data.test.clone())
        };
        if let Some(p) = &private
            && p.label_names != labels
        {
            let labels_p = p.label_names.clone();
            *lock(&self.model) = Some(slm);
            return Err(Error::Data(format!(
                "the private data's labels {labels_p:?} differ from the model's {labels:?}"
            )));
        }
        let n_private = self
            .config
            .n_private
            .unwrap_or_else(|| private.as_ref().map_or(0, |p| p.len() as u64));
        let mut scorer = SlmScorer::new(slm).with_pool(self.pool.clone());
        let learning = private.is_some();
        if let Some(private) = private {
            let mut train = TrainConfig::for_round(arch);
            if let Some(e) = self.config.round_epochs {
                train.epochs = e;
            }
            // Few private examples: no validation split, train on all of it.
            train.validation_fraction = 0.0;
            train.seed = self.config.seed;
            scorer = scorer.with_learning(Learning {
                private: hard_examples(&private),
                test: test.map(|t| t.examples.into_iter().map(|e| (e.text, e.label)).unzip()),
                train,
                defaults: LearnSettings {
                    min_quality: self.config.min_quality,
                    soft_targets: self.config.soft_targets,
                    ..LearnSettings::default()
                },
                checkpoint: Some(swap::sibling(&self.checkpoint_dir(), "new")),
            });
        }
        let reporter = self.reporter.clone();
        let scorer = scorer.with_train_progress(Box::new(move |p: &TrainProgress| {
            reporter.report(
                Activity::Learning,
                p.step as u64,
                p.total_steps as u64,
                format!("epoch {}/{}", p.epoch, p.epochs),
            )
        }));
        let mut scorer = Some(scorer);
        let info = ClientInfo {
            name: self.config.name.clone(),
            slm_arch: arch.to_string(),
            n_private,
        };
        // Rounds until done or cancelled; a lost link (a coordinator crash, a network change)
        // is tried again with backoff and jitter, a refusal or a clean close is final.
        let mut results = 0u64;
        let mut backoff = Backoff::new(self.config.reconnect);
        let r = loop {
            self.reporter
                .report(Activity::Connecting, 0, 0, format!("connecting to {addr}"));
            let attempt = match self
                .connecting(addr, Session::connect(addr, &identity, info.clone()))
                .await
            {
                Ok(mut session) => {
                    backoff.reset();
                    tracing::info!(client = session.client_id(), "joined; waiting for rounds");
                    self.reporter.report(
                        Activity::Waiting,
                        0,
                        0,
                        format!("joined {addr} as {}", session.client_id()),
                    );
                    let left = rounds.map(|r| r.saturating_sub(results));
                    let r = self
                        .take_part(&mut session, &mut scorer, left, learning, &mut results)
                        .await;
                    self.reporter
                        .report(Activity::Stopping, 0, 0, "leaving the coordinator");
                    // Bounded: a vanished coordinator must not hold up leaving.
                    let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
                    r
                }
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => break Ok(results),
                Err(Error::Cancelled) => break Ok(results),
                Err(e) if e.is_link_failure() && scorer.is_some() => {
                    let Some(wait) = backoff.next_delay(&mut rand::rng()) else {
                        break Err(e);
                    };
                    tracing::warn!(error = %e, tried = backoff.tried(), wait_ms = wait.as_millis() as u64, "link lost; reconnecting");
                    self.reporter.report(
                        Activity::Connecting,
                        0,
                        0,
                        format!(
                            "link lost ({e}); trying again in {:.1}s",
                            wait.as_secs_f64()
                        ),
                    );
                    let mut rx = self.cancel.subscribe();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancelled(&mut rx) => break Ok(results),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(s) = scorer {
            *lock(&self.model) = Some(s.into_inner());
        }
        let rounds_done = r?;
        let state = lock(&self.state).clone();
        Ok(JoinSummary {
            rounds: rounds_done,
            last_round: state.last_round,
            local_accuracy: state.local_accuracy,
            cancelled: *self.cancel.borrow(),
        })
    }

    /// [`Client::join`]'s rounds: the SDK's one round loop with this client's hooks.
    /// Counts the results it receives into `results` as they come, so that a session lost
    /// midway keeps its count.
    async fn take_part(
        &self,
        session: &mut Session,
        scorer: &mut Option<SlmScorer>,
        rounds: Option<u64>,
        learning: bool,
        results: &mut u64,
    ) -> Result<()> {
        let mut hooks = JoinHooks {
            client: self,
            learning,
            results,
        };
        let cancel = self.cancel.subscribe();
        run_rounds(session, scorer, rounds, &mut hooks, Some(cancel)).await?;
        Ok(())
    }
}

fn restore_model(slot: &Mutex<Option<Box<dyn Slm>>>, model: Option<Box<dyn Slm>>) {
    if model.is_some() {
        *lock(slot) = model;
    }
}

fn hard_examples(d: &Dataset) -> Vec<TrainExample> {
    d.examples
        .iter()
        .map(|e| TrainExample::hard(e.text.clone(), e.label, d.num_labels()))
        .collect()
}

fn test_accuracy(slm: &dyn Slm, test: Option<&Dataset>) -> Result<Option<f32>> {
    let Some(test) = test.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let texts: Vec<&str> = test.examples.iter().map(|e| e.text.as_str()).collect();
    let labels: Vec<usize> = test.examples.iter().map(|e| e.label).collect();
    Ok(Some(slm::accuracy(slm, &texts, &labels)? as f32))
}

/// How [`Client::join`] shows rounds: progress to the listener, state and checkpoint to disk.
struct JoinHooks<'a> {
    client: &'a Client,
    /// The model trains after each round (private data loaded): commit its checkpoint.
    learning: bool,
    /// Round results received so far in this join.
    results: &'a mut u64,
}

impl RoundHooks for JoinHooks<'_> {
    fn result(&mut self, _round: u64) {
        *self.results += 1;
    }

    fn scoring(&mut self, round: u64, task: &TaskInfo, done: usize, total: usize) {
        let message = if done == 0 {
            format!("scoring {total} samples of task {}", task.name)
        } else {
            "scoring".to_string()
        };
        self.client.reporter.emit(Progress {
            activity: Activity::Scoring,
            round: Some(round),
            done: done as u64,
            total: total as u64,
            loss: None,
            accuracy: None,
            message,
        });
    }

    fn scored(&mut self, round: u64) {
        self.client.reporter.report(
            Activity::Waiting,
            0,
            0,
            format!("scores for round {round} sent; waiting for the result"),
        );
    }

    fn learning(&mut self, round: u64) {
        self.client.reporter.report(
            Activity::Learning,
            0,
            0,
            format!("round {round} finished; training on its result"),
        );
    }

    fn learned(&mut self, round: u64, acc: Option<f32>) -> Result<()> {
        if self.learning {
            swap::commit(&self.client.checkpoint_dir())?;
        }
        self.client.update_state(|s| {
            s.rounds_completed += 1;
            s.last_round = Some(round);
            if acc.is_some() {
                s.local_accuracy = acc;
            }
        })?;
        self.client.reporter.emit(Progress {
            activity: Activity::RoundFinished,
            round: Some(round),
            done: 1,
            total: 1,
            loss: None,
            accuracy: acc,
            message: match acc {
                Some(a) => format!("round {round} finished, local accuracy {a:.4}"),
                None => format!("round {round} finished"),
            },
        });
        self.client
            .reporter
            .report(Activity::Waiting, 0, 0, "waiting for the next round");
        Ok(())
    }

    fn skip(&mut self, round: u64) -> bool {
        let paused = self.client.paused.load(std::sync::atomic::Ordering::SeqCst);
        if paused {
            self.client.reporter.report(
                Activity::Waiting,
                0,
                0,
                format!("paused: sat out round {round}"),
            );
        }
        paused
    }

    fn privacy(
        &mut self,
        round: u64,
        requested: Option<ScorePrivacy>,
    ) -> std::result::Result<Option<f64>, String> {
        let floor = self.client.config.privacy;
        let mut ledger = lock(&self.client.state).privacy.clone();
        let noise = ledger.admit(round, &floor, requested)?;
        // On disk before any score leaves: a crash after sending must not forget the spend.
        self.client
            .update_state(|s| s.privacy = ledger)
            .map_err(|e| format!("could not record the privacy spend: {e}"))?;
        Ok(noise)
    }

    fn noise_rng(&mut self, round: u64) -> StdRng {
        match self.client.config.privacy.noise_seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            None => StdRng::from_os_rng(),
        }
    }

    fn failed(&mut self, round: u64, reason: &str) {
        self.client.reporter.report(
            Activity::Waiting,
            0,
            0,
            format!("round {round} failed: {reason}"),
        );
    }
}

/// Runs CPU-heavy work (models are not `Sync`) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker thread failed: {e}")))
}
