//! Running an experiment: data split and partition, local-only training, then each variant.
//! The round-based variants run the real coordinator daemon and one real client per device
//! (enrollment, mutual TLS, QUIC on loopback), in this process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::{FileGenerator, GeneratedSample, Generator, LlmGenerator};
use crosslm_coordinator::llm::Llm;
use crosslm_coordinator::llm::device::{self, Placement};
use crosslm_coordinator::round::RoundConfig;
use crosslm_coordinator::store::Store;
use crosslm_coordinator::task::TaskSpec;
use crosslm_coordinator::tuning::{Evaluator, LlmReport, TuningConfig, load_general};
use crosslm_sdk::client::{
    Activity, Client as SdkClient, ClientConfig, Progress as DeviceProgress,
};
use crosslm_sdk::data::{self, BadRows, TableSpec};
use crosslm_sdk::method::LearnSchedule;
use crosslm_sdk::privacy::PrivacyFloor;
use crosslm_sdk::protocol::{
    AggregatedScore, ArchTraining, LearnSettings, SyntheticSample, TaskInfo,
};
use crosslm_sdk::slm::{
    Arch, Backend, Slm, TrainConfig, TrainExample, accuracy, load_checkpoint, new_slm,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::attack::run_attacker;
use crate::config::{EvalSplit, ExperimentConfig, Partition, SlmTraining, Variant};
use crate::report::{ClientMeta, Metrics, RoundMetrics, RoundSplit, VariantResult};

/// Wall seconds of each round's phases as they happen: the generator's, and the slowest
/// client's scoring and training.
#[derive(Default, Clone)]
struct Phases(Arc<Mutex<PhaseLog>>);

#[derive(Default)]
struct PhaseLog {
    /// Per round: seconds the LLM generated, `None` when the batch came from the cache.
    generation: BTreeMap<u64, Option<f64>>,
    scoring: BTreeMap<u64, f64>,
    training: BTreeMap<u64, f64>,
}

impl Phases {
    fn record(&self, f: impl FnOnce(&mut PhaseLog)) {
        if let Ok(mut log) = self.0.lock() {
            f(&mut log);
        }
    }

    fn client_phase(map: &mut BTreeMap<u64, f64>, round: u64, secs: f64) {
        let slowest = map.entry(round).or_insert(0.0);
        *slowest = slowest.max(secs);
    }

    /// A round's split, the LLM's side from its report.
    fn split(&self, round: u64, llm: Option<&LlmReport>) -> RoundSplit {
        let log = self.0.lock().ok();
        let generation = log.as_ref().and_then(|l| l.generation.get(&round).copied());
        RoundSplit {
            generation: generation.flatten(),
            generation_cached: matches!(generation, Some(None)),
            scoring: log.as_ref().and_then(|l| l.scoring.get(&round).copied()),
            llm_tuning: llm.filter(|l| l.tuned).map(|l| l.tune_secs),
            llm_evaluation: llm.map(|l| l.eval_secs),
            client_training: log.as_ref().and_then(|l| l.training.get(&round).copied()),
        }
    }
}

/// A client's phase in progress, for [`Phases`].
#[derive(Default)]
struct ClientClock {
    round: u64,
    scoring: Option<Instant>,
    learning: Option<Instant>,
}

/// One simulated device.
pub struct Client {
    /// Enrollment name.
    pub name: String,
    /// SLM architecture.
    pub arch: Arch,
    /// Private examples, labels as task label indices.
    pub private: Vec<(String, usize)>,
}

/// Everything the variants share.
pub struct Ctx {
    /// The config.
    pub cfg: ExperimentConfig,
    /// The task.
    pub spec: TaskSpec,
    /// `<out>/<name>`.
    pub dir: PathBuf,
    /// Frozen-LLM generations and the zero-shot evaluation, shared by runs of the same task,
    /// data, seed and split (the LLM and its seeds are the same, so are its outputs).
    pub cache: PathBuf,
    /// Assets dir.
    pub assets: PathBuf,
    /// Where the LLM runs (`llm_device`, resolved once).
    pub placement: Placement,
    /// The clients.
    pub clients: Vec<Client>,
    /// Held-out examples the variants are measured on: the test split, or the validation
    /// split under `evaluate_on = "validation"`.
    pub test: Vec<(String, usize)>,
    /// Validation examples: from the training pool, held by no client, disjoint from `test`.
    pub validation: Vec<(String, usize)>,
    /// Pool examples in none of the above (no client's, not test, not validation), shuffled:
    /// what the `real_data` oracle serves.
    pub unseen: Vec<(String, usize)>,
    /// General text for perplexity.
    pub general: Vec<String>,
    /// Progress display.
    pub mp: MultiProgress,
}

fn bar(mp: &MultiProgress, len: u64, msg: impl Into<String>) -> ProgressBar {
    let b = mp.add(ProgressBar::new(len));
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(250));
    b.set_message(msg.into());
    b
}

impl Ctx {
    /// Loads the task and data, splits off the test set and partitions the rest.
    pub fn setup(cfg: ExperimentConfig, out: &Path, mp: MultiProgress) -> anyhow::Result<Self> {
        let assets = crosslm_sdk::data::assets_dir();
        let spec = TaskSpec::from_toml_file(&cfg.task)?;
        let path = assets.join(&cfg.data);
        let loaded = data::load_auto(&path, None, &TableSpec::default(), BadRows::Skip)
            .with_context(|| format!("loading {}", path.display()))?;
        let ds = loaded.dataset;
        // The data set's label names onto the task's.
        let map: Vec<usize> = ds
            .label_names
            .iter()
            .map(|n| {
                spec.label_index(n).with_context(|| {
                    format!("data label {n:?} is not one of task {}'s labels", spec.name)
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let n = ds.examples.len();
        if n < cfg.test_size * 2 {
            bail!(
                "{} has {n} examples, too few for a test split of {}",
                path.display(),
                cfg.test_size
            );
        }
        let (pool, test) = ds.split(cfg.test_size as f64 / n as f64 * 1.02, cfg.seed)?;
        let test = test.sample(cfg.test_size, cfg.seed);
        let archs = cfg.archs();
        let parts = match cfg.partition {
            Partition::Iid => pool.partition_iid(archs.len(), cfg.seed)?,
            Partition::Dirichlet(a) => pool.partition_dirichlet(archs.len(), a, cfg.seed)?,
        };
        let clients = parts
            .into_iter()
            .zip(&archs)
            .enumerate()
            .map(|(i, (p, arch))| {
                let p = p.sample(cfg.per_client, cfg.seed.wrapping_add(i as u64));
                Client {
                    name: format!("client-{i}"),
                    arch: *arch,
                    private: p
                        .examples
                        .into_iter()
                        .map(|e| (e.text, map[e.label]))
                        .collect(),
                }
            })
            .collect::<Vec<_>>();
        if let Some(c) = clients.iter().find(|c| c.private.is_empty()) {
            bail!("{} got no private examples", c.name);
        }
        // Validation: pool examples no client holds, for choices that must not look at the
        // test split.
        let held: std::collections::HashSet<&str> = clients
            .iter()
            .flat_map(|c| c.private.iter().map(|(t, _)| t.as_str()))
            .collect();
        let rest = data::Dataset {
            label_names: ds.label_names.clone(),
            examples: pool
                .examples
                .iter()
                .filter(|e| !held.contains(e.text.as_str()))
                .cloned()
                .collect(),
        };
        // The data set repeats some sentences, so a pool text may also be a test text.
        let test_texts: std::collections::HashSet<&str> =
            test.examples.iter().map(|e| e.text.as_str()).collect();
        let validation = rest
            .sample(cfg.validation_size, cfg.seed.wrapping_add(0x5eed))
            .examples
            .into_iter()
            .filter(|e| !test_texts.contains(e.text.as_str()))
            .map(|e| (e.text, map[e.label]))
            .collect::<Vec<_>>();
        let mut taken = test_texts;
        taken.extend(validation.iter().map(|(t, _)| t.as_str()));
        let unseen = rest
            .sample(rest.examples.len(), cfg.seed.wrapping_add(0x0ac1e))
            .examples
            .into_iter()
            .filter(|e| !taken.contains(e.text.as_str()))
            .map(|e| (e.text, map[e.label]))
            .collect();
        let general = load_general(&assets.join(&cfg.general), cfg.general_size)?;
        let placement = device::resolve(cfg.llm_device)?;
        let key = cache_key(&cfg, &spec, placement)?;
        let test = match cfg.evaluate_on {
            EvalSplit::Test => test
                .examples
                .into_iter()
                .map(|e| (e.text, map[e.label]))
                .collect(),
            EvalSplit::Validation => validation.clone(),
        };
        Ok(Self {
            dir: out.join(&cfg.name),
            cache: out.join(".cache").join(key),
            test,
            validation,
            unseen,
            spec,
            assets,
            placement,
            clients,
            general,
            mp,
            cfg,
        })
    }

    /// Client metadata for the report.
    pub fn client_meta(&self) -> Vec<ClientMeta> {
        self.clients
            .iter()
            .map(|c| {
                let mut counts = vec![0; self.spec.labels.len()];
                for (_, l) in &c.private {
                    counts[*l] += 1;
                }
                ClientMeta {
                    name: c.name.clone(),
                    arch: c.arch,
                    n_private: c.private.len(),
                    label_counts: counts,
                }
            })
            .collect()
    }

    fn labels(&self) -> Vec<String> {
        self.spec.labels.iter().map(|l| l.name.clone()).collect()
    }

    fn examples(&self, rows: &[(String, usize)]) -> Vec<TrainExample> {
        let n = self.spec.labels.len();
        rows.iter()
            .map(|(t, l)| TrainExample::hard(t.clone(), *l, n))
            .collect()
    }

    fn train_cfg(&self, arch: Arch, initial: bool, seed: u64) -> TrainConfig {
        let t: &SlmTraining = self.cfg.training(arch);
        TrainConfig {
            epochs: if initial {
                t.epochs_initial
            } else {
                t.epochs_per_round
            },
            learning_rate: if initial {
                t.lr_initial
            } else {
                t.lr_per_round
            },
            batch_size: t.batch_size,
            // Tiny private sets: no validation split, train on all of it.
            validation_fraction: 0.0,
            seed,
            ..TrainConfig::for_arch(arch)
        }
    }

    fn test_accuracy(&self, slm: &dyn Slm) -> anyhow::Result<f32> {
        let texts: Vec<&str> = self.test.iter().map(|(t, _)| t.as_str()).collect();
        let labels: Vec<usize> = self.test.iter().map(|(_, l)| *l).collect();
        Ok(accuracy(slm, &texts, &labels)? as f32)
    }

    fn fresh_slm(&self, arch: Arch) -> anyhow::Result<Box<dyn Slm>> {
        Ok(new_slm(
            arch,
            &self.assets.join(&self.cfg.minilm),
            self.labels(),
            self.cfg.max_len,
            Backend::Flex,
        )?)
    }

    /// Where client `i`'s local-only model is saved.
    pub fn initial_ckpt(&self, i: usize) -> PathBuf {
        self.dir.join("models").join(format!("client-{i}-round0"))
    }

    /// Local-only training of every client (round 0 of every variant); returns accuracies.
    /// Checkpoints are reused when present and `accs` is given.
    pub fn initial(&self, known: Option<&[f32]>) -> anyhow::Result<Vec<f32>> {
        if let Some(accs) = known
            && accs.len() == self.clients.len()
            && (0..accs.len()).all(|i| self.initial_ckpt(i).join("meta.json").is_file())
        {
            return Ok(accs.to_vec());
        }
        let pb = bar(&self.mp, self.clients.len() as u64, "local-only training");
        let mut accs = Vec::new();
        for (i, c) in self.clients.iter().enumerate() {
            pb.set_message(format!("local-only training: {} ({})", c.name, c.arch));
            let mut slm = self.fresh_slm(c.arch)?;
            let seed = self.cfg.seed.wrapping_add(i as u64);
            slm.train(
                &self.examples(&c.private),
                &self.train_cfg(c.arch, true, seed),
                &mut |_| {},
            )?;
            slm.save(&self.initial_ckpt(i))?;
            let acc = self.test_accuracy(slm.as_ref())?;
            tracing::info!(client = %c.name, arch = %c.arch, accuracy = acc, "local-only model");
            accs.push(acc);
            pb.inc(1);
        }
        pb.finish_with_message("local-only training done");
        // Kept variants started from the earlier checkpoints: say so if these differ.
        if let Some(known) = known
            && known != accs.as_slice()
        {
            tracing::warn!(
                ?known,
                now = ?accs,
                "local-only models retrained with different accuracies; variants kept from \
                 the earlier run started elsewhere (use --fresh to rerun them)"
            );
        }
        Ok(accs)
    }

    /// Runs one variant.
    pub fn run(&self, v: Variant, initial: &[f32]) -> anyhow::Result<VariantResult> {
        let started = Instant::now();
        let round0 = RoundMetrics {
            round: 0,
            slm: crate::report::honest_only(initial, &self.cfg),
            llm: None,
            samples: None,
            mean_quality: None,
            kept: None,
            split: None,
        };
        let mut rounds = match v {
            Variant::Standalone => self.standalone()?,
            Variant::Centralized => self.centralized()?,
            Variant::Fedavg => self.fedavg()?,
            Variant::Synthetic
            | Variant::CrosslmFrozenLlm
            | Variant::Crosslm
            | Variant::RealData => tokio::runtime::Runtime::new()?.block_on(self.rounds(v))?,
        };
        if let Some(r0) = rounds.first_mut().filter(|r| r.round == 0) {
            // The LLM's start was measured (or read from the cache) by the daemon as round 0.
            r0.slm = round0.slm.clone();
        } else if v != Variant::Centralized && v != Variant::Fedavg {
            rounds.insert(0, round0);
        }
        Ok(VariantResult {
            variant: v,
            rounds,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Each client trains on its private data only, as many per-round updates as CrossLM.
    fn standalone(&self) -> anyhow::Result<Vec<RoundMetrics>> {
        let n = self.clients.len();
        let pb = bar(&self.mp, (n as u64) * self.cfg.rounds, "standalone");
        let mut accs = vec![vec![None; n]; self.cfg.rounds as usize];
        for (i, c) in self.clients.iter().enumerate() {
            let mut slm = load_checkpoint(&self.initial_ckpt(i), Backend::Flex)?;
            for (r, round) in accs.iter_mut().enumerate() {
                pb.set_message(format!("standalone: {} round {}", c.name, r + 1));
                let seed = self.cfg.seed.wrapping_add(1000 * (r as u64 + 1) + i as u64);
                slm.train(
                    &self.examples(&c.private),
                    &self.train_cfg(c.arch, false, seed),
                    &mut |_| {},
                )?;
                round[i] = Some(self.test_accuracy(slm.as_ref())?);
                pb.inc(1);
            }
        }
        pb.finish_with_message("standalone done");
        Ok(accs
            .into_iter()
            .enumerate()
            .map(|(r, slm)| plain_round(r as u64 + 1, slm))
            .collect())
    }

    /// One model per architecture on every client's private data pooled.
    fn centralized(&self) -> anyhow::Result<Vec<RoundMetrics>> {
        let pooled: Vec<(String, usize)> = self
            .clients
            .iter()
            .flat_map(|c| c.private.iter().cloned())
            .collect();
        let mut archs: Vec<Arch> = self.clients.iter().map(|c| c.arch).collect();
        archs.sort_by_key(|a| *a as u8);
        archs.dedup();
        let pb = bar(&self.mp, archs.len() as u64, "centralized");
        let mut per_arch = Vec::new();
        for arch in archs {
            pb.set_message(format!("centralized: {arch} on {} examples", pooled.len()));
            let mut slm = self.fresh_slm(arch)?;
            let t = self.cfg.training(arch);
            let cfg = TrainConfig {
                epochs: t.epochs_centralized,
                ..self.train_cfg(arch, true, self.cfg.seed)
            };
            slm.train(&self.examples(&pooled), &cfg, &mut |_| {})?;
            per_arch.push((arch, self.test_accuracy(slm.as_ref())?));
            pb.inc(1);
        }
        pb.finish_with_message("centralized done");
        let slm = self
            .clients
            .iter()
            .map(|c| per_arch.iter().find(|(a, _)| *a == c.arch).map(|x| x.1))
            .collect();
        Ok(vec![plain_round(self.cfg.rounds, slm)])
    }

    /// Federated averaging of the MiniLM clients' weights (weighted by private data size):
    /// a first round of local-only epochs, then `rounds` rounds of per-round epochs. Weights
    /// are averaged in this process: FedAvg is a baseline, not part of the system.
    fn fedavg(&self) -> anyhow::Result<Vec<RoundMetrics>> {
        let members: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].arch == Arch::Minilm)
            .collect();
        if members.is_empty() {
            bail!("FedAvg needs MiniLM clients");
        }
        let total: f64 = members
            .iter()
            .map(|&i| self.clients[i].private.len() as f64)
            .sum();
        let mut slm = self.fresh_slm(Arch::Minilm)?;
        let mut global = slm.weights()?;
        let rounds = self.cfg.rounds + 1;
        let pb = bar(&self.mp, rounds * members.len() as u64, "FedAvg");
        let mut out = Vec::new();
        for r in 0..rounds {
            let mut avg = vec![0.0f64; global.len()];
            for &i in &members {
                let c = &self.clients[i];
                pb.set_message(format!("FedAvg round {r}: {}", c.name));
                slm.set_weights(&global)?;
                let seed = self.cfg.seed.wrapping_add(1000 * r + i as u64);
                slm.train(
                    &self.examples(&c.private),
                    &self.train_cfg(Arch::Minilm, r == 0, seed),
                    &mut |_| {},
                )?;
                let w = c.private.len() as f64 / total;
                for (a, x) in avg.iter_mut().zip(slm.weights()?) {
                    *a += w * x as f64;
                }
                pb.inc(1);
            }
            global = avg.into_iter().map(|x| x as f32).collect();
            slm.set_weights(&global)?;
            let acc = self.test_accuracy(slm.as_ref())?;
            tracing::info!(round = r, accuracy = acc, "FedAvg global model");
            let slm_accs = self
                .clients
                .iter()
                .map(|c| (c.arch == Arch::Minilm).then_some(acc))
                .collect();
            out.push(plain_round(r, slm_accs));
        }
        pb.finish_with_message("FedAvg done");
        Ok(out)
    }

    /// The LLM behind a round-based variant: tuned for CrossLM, frozen otherwise; its frozen
    /// batches and zero-shot evaluation shared through the cache.
    fn llm_generator(
        &self,
        v: Variant,
        coord_dir: &Path,
        phases: Phases,
    ) -> anyhow::Result<Cached> {
        let cfg = &self.cfg;
        let llm_path = self.assets.join(&cfg.llm);
        let llm = Llm::load(&llm_path, &self.placement.device())
            .with_context(|| format!("loading {}", llm_path.display()))?;
        let mut inner = LlmGenerator::new(llm, self.spec.clone(), cfg.seed);
        if v == Variant::Crosslm {
            let test = self.test[..cfg.llm_test_size.min(self.test.len())].to_vec();
            inner = inner
                .with_evaluator(Evaluator::from_parts(test, self.general.clone()))
                .with_tuning(resolve_tuning(cfg, &self.assets), coord_dir.join("llm"))?;
        } else {
            inner = inner.with_tuning(
                TuningConfig {
                    enabled: false,
                    ..cfg.tuning.clone()
                },
                coord_dir.join("llm"),
            )?;
        }
        Ok(Cached {
            inner,
            phases,
            dir: self.cache.clone(),
            // Before any tuning the LLM is the frozen one: its round-1 batch is shared.
            frozen_through: if v == Variant::Crosslm { 1 } else { u64::MAX },
            eval_key: match cfg.evaluate_on {
                EvalSplit::Test => format!("l{}-g{}", cfg.llm_test_size, cfg.general_size),
                EvalSplit::Validation => format!(
                    "val{}-l{}-g{}",
                    cfg.validation_size, cfg.llm_test_size, cfg.general_size
                ),
            },
        })
    }

    /// The `real_data` oracle's generator: the unseen pool written as the coordinator's sample
    /// file (next to its data dir, a record of what was served), `samples_per_label` a label
    /// per round in shuffled order.
    fn real_data(&self, coord_dir: &Path) -> anyhow::Result<FileGenerator> {
        let path = coord_dir.with_file_name("real-data.jsonl");
        let mut out = String::new();
        for (text, label) in &self.unseen {
            let line = serde_json::json!({ "text": text, "label": self.spec.labels[*label].name });
            out += &line.to_string();
            out.push('\n');
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        Ok(FileGenerator::load(&path, &self.spec.info())?)
    }

    /// CrossLM (tuned or frozen LLM) or synthetic data without feedback: the real daemon and
    /// one real client per device, over QUIC on loopback.
    async fn rounds(&self, v: Variant) -> anyhow::Result<Vec<RoundMetrics>> {
        let cfg = &self.cfg;
        let n = self.clients.len();
        let coord_dir = self
            .dir
            .join(format!("{v:?}").to_lowercase())
            .join("coordinator");
        if coord_dir.exists() {
            std::fs::remove_dir_all(&coord_dir)?;
        }
        let phases = Phases::default();
        let generator: Box<dyn Generator> = if v == Variant::RealData {
            Box::new(self.real_data(&coord_dir)?)
        } else {
            Box::new(self.llm_generator(v, &coord_dir, phases.clone())?)
        };
        let daemon_cfg = DaemonConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: coord_dir.clone(),
            rounds: Some(cfg.rounds),
            samples_per_label: cfg.samples_per_label,
            min_clients: n,
            round: RoundConfig {
                quorum: n,
                deadline_ms: 60 * 60 * 1000,
                prior_correction: cfg.prior_correction,
                aggregation: cfg.aggregation,
            },
            idle_timeout_ms: 120_000,
            linger_ms: 60 * 60 * 1000,
            learning: Some(self.learn_schedule(v)),
            privacy: cfg.privacy,
            admin: None,
            ..Default::default()
        };
        let tokens = mint_tokens(&coord_dir, n)?;
        let mut daemon = Daemon::start(daemon_cfg, self.spec.info(), generator).await?;
        let addr = daemon.addr;
        let pb = bar(
            &self.mp,
            cfg.rounds * n as u64,
            format!("{}: LLM measuring/generating", v.label()),
        );
        let label_names = self.labels();
        let named = |rows: &[(String, usize)]| -> Vec<(String, String)> {
            rows.iter()
                .map(|(t, l)| (t.clone(), label_names[*l].clone()))
                .collect()
        };
        let test_rows = named(&self.test);
        let clients_dir = coord_dir
            .parent()
            .map_or_else(|| coord_dir.join("clients"), |p| p.join("clients"));
        let mut tasks = Vec::new();
        for (i, (c, token)) in self.clients.iter().zip(tokens).enumerate() {
            if let Some(attack) = cfg.attack.filter(|a| i < a.clients) {
                let (name, n_private, rounds) =
                    (c.name.clone(), c.private.len() as u64, cfg.rounds);
                tasks.push(tokio::spawn(async move {
                    let kind = attack.kind;
                    run_attacker(addr, &token, &name, n_private, kind, rounds).await
                }));
                continue;
            }
            // Each device is the SDK's `Client`, as the binary and the bindings run it: its
            // own data dir, a copy of its local-only model, its private rows.
            let data_dir = clients_dir.join(&c.name);
            if data_dir.exists() {
                std::fs::remove_dir_all(&data_dir)?;
            }
            copy_dir(&self.initial_ckpt(i), &data_dir.join("checkpoint"))?;
            let device = Arc::new(SdkClient::open(ClientConfig {
                coordinator: Some(addr.to_string()),
                data_dir,
                name: c.name.clone(),
                arch: c.arch,
                backend: Backend::Flex,
                model_dir: self.assets.join(&cfg.minilm),
                checkpoint_dir: None,
                max_len: cfg.max_len,
                test_fraction: 0.0,
                n_private: Some(c.private.len() as u64),
                seed: cfg.seed.wrapping_add(i as u64),
                privacy: PrivacyFloor {
                    noise_seed: cfg
                        .privacy
                        .map(|_| cfg.seed.wrapping_mul(1000).wrapping_add(i as u64)),
                    ..PrivacyFloor::default()
                },
                ..ClientConfig::default()
            })?);
            device.load_data_rows(&named(&c.private))?;
            device.load_test_rows(&test_rows)?;
            let (bar, name, label) = (pb.clone(), c.name.clone(), v.label());
            let (phases, clock) = (phases.clone(), Mutex::new(ClientClock::default()));
            device.set_listener(Some(Arc::new(move |p: &DeviceProgress| {
                let Ok(mut clock) = clock.lock() else { return };
                match p.activity {
                    Activity::Scoring if p.done == 0 => {
                        clock.round = p.round.unwrap_or(clock.round);
                        clock.scoring = Some(Instant::now());
                        bar.set_message(format!("{label}: {name} scoring {} samples", p.total))
                    }
                    Activity::Scoring if p.done == p.total => {
                        if let Some(t) = clock.scoring.take() {
                            let (round, secs) = (clock.round, t.elapsed().as_secs_f64());
                            phases.record(|l| Phases::client_phase(&mut l.scoring, round, secs));
                        }
                    }
                    Activity::Learning if p.done == 0 => {
                        clock.learning = Some(Instant::now());
                        bar.set_message(format!("{label}: {name} training on the round"))
                    }
                    Activity::RoundFinished => {
                        if let Some(t) = clock.learning.take() {
                            let round = p.round.unwrap_or(clock.round);
                            let secs = t.elapsed().as_secs_f64();
                            phases.record(|l| Phases::client_phase(&mut l.training, round, secs));
                        }
                        bar.inc(1);
                        if let Some(acc) = p.accuracy {
                            bar.println(format!("  {label} {name}: accuracy {acc:.3}"));
                        }
                    }
                    _ => {}
                }
            })));
            let rounds = cfg.rounds;
            tasks.push(tokio::spawn(async move {
                device.enroll(&token.to_string()).await?;
                let summary = device.join(Some(rounds)).await?;
                Ok::<u64, crosslm_sdk::Error>(summary.rounds)
            }));
        }
        for t in tasks {
            let done = t.await.context("client task")??;
            if done != cfg.rounds {
                bail!("a client took part in {done} of {} rounds", cfg.rounds);
            }
        }
        daemon.wait().await?;
        pb.finish_with_message(format!("{} done", v.label()));
        drop(daemon);
        self.collect(&coord_dir, &phases)
    }

    /// How the clients learn from each round: the experiment's client settings, sent by the
    /// coordinator with every round. Synthetic and the oracle train on every sample with its
    /// given label.
    fn learn_schedule(&self, v: Variant) -> LearnSchedule {
        let cfg = &self.cfg;
        let training = [Arch::Minilm, Arch::Bag]
            .into_iter()
            .map(|arch| {
                let t = cfg.training(arch);
                ArchTraining {
                    arch: arch.to_string(),
                    epochs: Some(t.epochs_per_round as u32),
                    learning_rate: Some(t.lr_per_round),
                    batch_size: Some(t.batch_size as u32),
                }
            })
            .collect();
        LearnSchedule {
            settings: LearnSettings {
                use_scores: !matches!(v, Variant::Synthetic | Variant::RealData)
                    && cfg.client_use_scores,
                min_quality: cfg.min_quality,
                soft_targets: cfg.client_soft_targets,
                balance_labels: cfg.client_balance_labels,
                relative_weights: cfg.client_relative_weights,
                training,
            },
            min_quality_from_round: cfg.min_quality_from_round,
        }
    }

    /// Per-round metrics from the coordinator's store: the clients' reports (sent over the
    /// network after each round), the rounds' quality, the LLM's reports.
    fn collect(&self, coord_dir: &Path, phases: &Phases) -> anyhow::Result<Vec<RoundMetrics>> {
        let store = Store::open(coord_dir)?;
        let names: std::collections::HashMap<String, usize> = store
            .clients()?
            .into_iter()
            .filter_map(|c| {
                let i = self.clients.iter().position(|x| x.name == c.info.name)?;
                Some((c.id, i))
            })
            .collect();
        let llm: Vec<LlmReport> = store.llm_reports()?;
        let mut out = Vec::new();
        if let Some(r0) = llm.iter().find(|r| r.round == 0) {
            out.push(RoundMetrics {
                round: 0,
                slm: vec![],
                llm: Some(r0.clone()),
                samples: None,
                mean_quality: None,
                kept: None,
                split: None,
            });
        }
        for s in store.summaries()? {
            let mut slm = vec![None; self.clients.len()];
            for (id, acc) in store.reports(s.id)? {
                if let Some(&i) = names.get(&id) {
                    slm[i] = Some(acc);
                }
            }
            // What the CrossLM clients trained on: every sample before the threshold's round.
            let threshold = crosslm_sdk::method::scheduled_threshold(
                self.cfg.min_quality,
                self.cfg.min_quality_from_round,
                s.id,
            );
            let kept = store.result(s.id)?.map(|o| {
                o.scores
                    .iter()
                    .filter(|x| x.quality.is_finite() && x.rival_share() >= threshold)
                    .count()
            });
            let report = llm.iter().find(|r| r.round == s.id).cloned();
            out.push(RoundMetrics {
                round: s.id,
                slm,
                split: Some(phases.split(s.id, report.as_ref())),
                llm: report,
                samples: Some(s.samples),
                mean_quality: s.mean_quality,
                kept,
            });
        }
        Ok(out)
    }
}

fn plain_round(round: u64, slm: Vec<Option<f32>>) -> RoundMetrics {
    RoundMetrics {
        round,
        slm,
        llm: None,
        samples: None,
        mean_quality: None,
        kept: None,
        split: None,
    }
}

/// Copies a flat directory (a checkpoint) to `to`, replacing it.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Shares the frozen LLM's outputs between variants and runs: rounds up to `frozen_through`
/// are generated before any tuning, so a file from an earlier variant (same task, seed and
/// model) is the same batch; the zero-shot evaluation likewise.
struct Cached {
    inner: LlmGenerator,
    phases: Phases,
    dir: PathBuf,
    frozen_through: u64,
    eval_key: String,
}

/// A digest of the task spec that stays the same across builds (FNV-1a over its JSON), so
/// that cache directories outlive the binary that wrote them.
fn spec_digest(spec: &TaskSpec) -> anyhow::Result<u64> {
    let bytes = serde_json::to_vec(spec)?;
    Ok(bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }))
}

/// One sample of a cached frozen-LLM batch.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CachedSample {
    /// The sample.
    pub text: String,
    /// Its intended label.
    pub label: u32,
}

impl Generator for Cached {
    fn generate(
        &mut self,
        task: &TaskInfo,
        n: usize,
        round: u64,
    ) -> crosslm_coordinator::Result<Vec<GeneratedSample>> {
        let started = Instant::now();
        let timed = |out: Vec<GeneratedSample>, secs: Option<f64>| {
            self.phases.record(|l| {
                l.generation.insert(round, secs);
            });
            out
        };
        if round > self.frozen_through {
            let out = self.inner.generate(task, n, round)?;
            return Ok(timed(out, Some(started.elapsed().as_secs_f64())));
        }
        let path = self.dir.join(format!("frozen-round{round}-n{n}.json"));
        if let Some(v) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<CachedSample>>(&b).ok())
        {
            tracing::info!(round, file = %path.display(), "frozen-LLM batch from the cache");
            let out = v
                .into_iter()
                .map(|s| GeneratedSample {
                    text: s.text,
                    label: s.label,
                })
                .collect();
            return Ok(timed(out, None));
        }
        let out = self.inner.generate(task, n, round)?;
        let out = timed(out, Some(started.elapsed().as_secs_f64()));
        let rows: Vec<CachedSample> = out
            .iter()
            .map(|s| CachedSample {
                text: s.text.clone(),
                label: s.label,
            })
            .collect();
        write_json(&path, &rows);
        Ok(out)
    }

    fn baseline(&mut self) -> crosslm_coordinator::Result<Option<LlmReport>> {
        let path = self.dir.join(format!("zero-shot-{}.json", self.eval_key));
        if let Some(r) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<LlmReport>(&b).ok())
        {
            tracing::info!(file = %path.display(), "zero-shot evaluation from the cache");
            return Ok(Some(r));
        }
        let r = self.inner.baseline()?;
        if let Some(r) = &r {
            write_json(&path, r);
        }
        Ok(r)
    }

    fn feedback(
        &mut self,
        round: u64,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
    ) -> crosslm_coordinator::Result<Option<LlmReport>> {
        self.inner.feedback(round, samples, scores)
    }
}

/// The LLM's tuning settings with the rehearsal text resolved: by default the general-text
/// file, after the texts the evaluation reads (`rehearsal_skip` is raised to at least
/// `general_size`, so no evaluated text is ever trained on); a relative path is taken from
/// the assets folder.
pub fn resolve_tuning(cfg: &ExperimentConfig, assets: &Path) -> TuningConfig {
    let mut t = cfg.tuning.clone();
    let path = t
        .rehearsal_text
        .clone()
        .unwrap_or_else(|| cfg.general.clone());
    let path = assets.join(path);
    if crosslm_coordinator::tuning::same_file(&path, &assets.join(&cfg.general)) {
        t.rehearsal_skip = t.rehearsal_skip.max(cfg.general_size);
    }
    t.rehearsal_text = Some(path);
    t
}

/// A cache write that fails costs only time later.
fn write_json<T: serde::Serialize>(path: &Path, v: &T) {
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(path, serde_json::to_vec(v).unwrap_or_default()));
    if let Err(e) = r {
        tracing::warn!(file = %path.display(), error = %e, "cache not written");
    }
}

/// Whether an earlier run under `prev` is the same experiment as `now` (the variant list and
/// the CrossLM-only settings aside): `None` if not, else the variants it ran that must run
/// again because the CrossLM settings they depend on changed.
pub fn stale_variants(prev: &ExperimentConfig, now: &ExperimentConfig) -> Option<Vec<Variant>> {
    let key = |c: &ExperimentConfig| {
        let mut c = c.clone();
        c.variants.clear();
        c.client_soft_targets = false;
        c.min_quality_from_round = 1;
        c.client_use_scores = true;
        c.client_balance_labels = true;
        c.client_relative_weights = true;
        c.prior_correction = true;
        c.tuning = TuningConfig::default();
        // Only `probe-llm` reads the validation split, unless the variants are measured on it.
        if c.evaluate_on == EvalSplit::Test {
            c.validation_size = 0;
        }
        serde_json::to_value(&c).ok()
    };
    if key(prev) != key(now) {
        return None;
    }
    let client = prev.client_soft_targets != now.client_soft_targets
        || prev.min_quality_from_round != now.min_quality_from_round
        || prev.client_use_scores != now.client_use_scores
        || prev.client_balance_labels != now.client_balance_labels
        || prev.client_relative_weights != now.client_relative_weights
        || prev.prior_correction != now.prior_correction;
    let mut stale = Vec::new();
    if client {
        stale.push(Variant::CrosslmFrozenLlm);
    }
    if client || prev.tuning != now.tuning {
        stale.push(Variant::Crosslm);
    }
    Some(stale)
}

/// Runs a whole experiment (or continues one: finished variants in an existing
/// `metrics.json` of the same config are kept), writing results after each variant.
pub fn experiment(
    cfg: ExperimentConfig,
    out: &Path,
    fresh: bool,
    mp: MultiProgress,
) -> anyhow::Result<Metrics> {
    let ctx = Arc::new(Ctx::setup(cfg, out, mp)?);
    let previous = if fresh {
        None
    } else {
        Metrics::read(&ctx.dir).ok().and_then(|mut m| {
            let stale = stale_variants(&m.config, &ctx.cfg)?;
            let (drop, keep): (Vec<_>, Vec<_>) = m
                .variants
                .drain(..)
                .partition(|r| stale.contains(&r.variant));
            for r in &drop {
                tracing::info!(variant = ?r.variant, "CrossLM settings changed: runs again");
            }
            m.variants = keep;
            m.config
                .variants
                .retain(|v| !stale.contains(v) || ctx.cfg.variants.contains(v));
            Some(m)
        })
    };
    let initial = ctx.initial(previous.as_ref().map(|m| m.initial.as_slice()))?;
    let mut config = ctx.cfg.clone();
    if let Some(p) = &previous {
        // The union of what was run then and what runs now.
        for v in &p.config.variants {
            if !config.variants.contains(v) {
                config.variants.push(*v);
            }
        }
    }
    let mut metrics = Metrics {
        config,
        clients: ctx.client_meta(),
        initial,
        llm_zero_shot: previous.as_ref().and_then(|m| m.llm_zero_shot.clone()),
        variants: previous.map(|m| m.variants).unwrap_or_default(),
    };
    metrics.write(&ctx.dir)?;
    for &v in &ctx.cfg.variants {
        if metrics.variant(v).is_some() {
            ctx.mp
                .println(format!("{}: already in metrics.json, kept", v.label()))?;
            continue;
        }
        ctx.mp.println(format!("== {}", v.label()))?;
        let r = ctx.run(v, &metrics.initial)?;
        if let Some(z) = r
            .rounds
            .iter()
            .find(|r| r.round == 0)
            .and_then(|r| r.llm.clone())
        {
            metrics.llm_zero_shot = Some(z);
        }
        metrics.variants.push(r);
        metrics.write(&ctx.dir)?;
    }
    Ok(metrics)
}

/// Where a run's frozen-LLM batches and zero-shot results are cached: they depend on the LLM,
/// the data, the seed, the test split and the whole task spec (sampler, prompts,
/// classification template), not only on the task's name; and on the LLM's device where it
/// is a GPU (burn's f32 decoder there, not the CPU's quantized one; CPU keys carry no suffix).
fn cache_key(
    cfg: &ExperimentConfig,
    spec: &TaskSpec,
    placement: Placement,
) -> anyhow::Result<String> {
    let stem = |p: &Path, default: &'static str| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(default)
            .to_owned()
    };
    Ok(format!(
        "{}-{}-{}-s{}-t{}-{:016x}{}",
        spec.name,
        stem(&cfg.data, "data"),
        stem(&cfg.llm, "llm"),
        cfg.seed,
        cfg.test_size,
        spec_digest(spec)?,
        match placement {
            // What the CPU decoder cached is only its own version's.
            Placement::Cpu => format!("-d{}", crosslm_coordinator::llm::DECODER_VERSION),
            Placement::Cuda => "-cuda".to_owned(),
            Placement::Wgpu => "-wgpu".to_owned(),
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ExperimentConfig {
        let p = crosslm_sdk::data::workspace_root().join("examples/experiments/mr-iid.toml");
        ExperimentConfig::load_with(&p, &[]).unwrap()
    }

    #[test]
    fn cache_keys_follow_the_task_spec_not_only_its_name() {
        let tasks = crosslm_sdk::data::workspace_root().join("examples/tasks");
        let mr = TaskSpec::from_toml_file(tasks.join("mr.toml")).unwrap();
        let hot = TaskSpec::from_toml_file(tasks.join("mr-hot.toml")).unwrap();
        assert_eq!(mr.name, hot.name);
        assert_eq!(spec_digest(&mr).unwrap(), spec_digest(&mr.clone()).unwrap());
        assert_ne!(spec_digest(&mr).unwrap(), spec_digest(&hot).unwrap());
        let mut prompts = mr.clone();
        prompts.labels[0]
            .prompts
            .push("Write a negative sentence.".into());
        assert_ne!(spec_digest(&mr).unwrap(), spec_digest(&prompts).unwrap());
    }

    /// A bigger LLM's batches are never served from a smaller one's cache (nor the reverse).
    #[test]
    fn cache_keys_follow_the_llm() {
        let tasks = crosslm_sdk::data::workspace_root().join("examples/tasks");
        let mr = TaskSpec::from_toml_file(tasks.join("mr.toml")).unwrap();
        let mut other = cfg();
        other.llm = "qwen2/Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf".into();
        assert_eq!(
            cache_key(&cfg(), &mr, Placement::Cpu).unwrap(),
            cache_key(&cfg(), &mr, Placement::Cpu).unwrap()
        );
        assert_ne!(
            cache_key(&cfg(), &mr, Placement::Cpu).unwrap(),
            cache_key(&other, &mr, Placement::Cpu).unwrap()
        );
        // Nor from another version of the CPU decoder, nor another device.
        let key = cache_key(&cfg(), &mr, Placement::Cpu).unwrap();
        let version = format!("-d{}", crosslm_coordinator::llm::DECODER_VERSION);
        assert!(key.ends_with(&version), "{key}");
        assert_ne!(key, cache_key(&cfg(), &mr, Placement::Cuda).unwrap());
    }

    #[test]
    fn the_real_data_oracle_serves_only_examples_no_split_holds() {
        let mut cfg = cfg();
        cfg.validation_size = 100;
        let out = std::env::temp_dir().join(format!("crosslm-oracle-{}", std::process::id()));
        let ctx = Ctx::setup(cfg, &out, MultiProgress::new()).unwrap();
        let held: std::collections::HashSet<&str> = ctx
            .clients
            .iter()
            .flat_map(|c| c.private.iter())
            .chain(&ctx.test)
            .chain(&ctx.validation)
            .map(|(t, _)| t.as_str())
            .collect();
        // MR: 10,662 snippets less 400 test, 512 private, 100 validation (and duplicates).
        assert!(ctx.unseen.len() > 9_000, "{}", ctx.unseen.len());
        assert!(ctx.unseen.iter().all(|(t, _)| !held.contains(t.as_str())));
        // Both labels, in shuffled order (not the file's label-sorted one).
        let first: Vec<usize> = ctx.unseen[..20].iter().map(|(_, l)| *l).collect();
        assert!(first.contains(&0) && first.contains(&1), "{first:?}");
        // Served through the coordinator's file generator: each round a fresh, balanced batch
        // with the true labels.
        let mut g = ctx.real_data(&out.join("real_data/coordinator")).unwrap();
        let info = ctx.spec.info();
        let r1 = g.generate(&info, 8, 1).unwrap();
        let r2 = g.generate(&info, 8, 2).unwrap();
        assert_eq!(r1.len(), 16);
        assert!(r1.iter().all(|s| !r2.contains(s)));
        let truth: std::collections::HashMap<&str, usize> =
            ctx.unseen.iter().map(|(t, l)| (t.as_str(), *l)).collect();
        for s in r1.iter().chain(&r2) {
            assert_eq!(truth.get(s.text.as_str()), Some(&(s.label as usize)));
        }
        assert_eq!(r1.iter().filter(|s| s.label == 0).count(), 8);
        std::fs::remove_dir_all(&out).ok();
    }

    #[test]
    fn evaluating_on_validation_measures_on_examples_outside_the_test_split() {
        let mut cfg = cfg();
        cfg.validation_size = 150;
        let out = std::env::temp_dir().join(format!("crosslm-val-{}", std::process::id()));
        let on_test = Ctx::setup(cfg.clone(), &out, MultiProgress::new()).unwrap();
        cfg.evaluate_on = EvalSplit::Validation;
        let on_val = Ctx::setup(cfg, &out, MultiProgress::new()).unwrap();
        // 150 drawn, less any that repeat a test sentence.
        assert!(on_val.test.len() > 140, "{}", on_val.test.len());
        assert_eq!(on_val.test, on_test.validation);
        // Same clients, and the test split stays out of everything the run measures on.
        assert_eq!(on_val.clients[3].private, on_test.clients[3].private);
        let test: std::collections::HashSet<&str> =
            on_test.test.iter().map(|(t, _)| t.as_str()).collect();
        assert!(on_val.test.iter().all(|(t, _)| !test.contains(t.as_str())));
        assert!(
            on_val
                .unseen
                .iter()
                .all(|(t, _)| !test.contains(t.as_str()))
        );
    }

    #[test]
    fn resuming_reruns_only_the_variants_whose_settings_changed() {
        let prev = cfg();
        let mut now = prev.clone();
        now.variants = vec![Variant::Crosslm];
        assert_eq!(stale_variants(&prev, &now), Some(vec![]));
        now.tuning.epochs += 1;
        assert_eq!(stale_variants(&prev, &now), Some(vec![Variant::Crosslm]));
        for flip in [
            |c: &mut ExperimentConfig| c.client_soft_targets = !c.client_soft_targets,
            |c: &mut ExperimentConfig| c.min_quality_from_round ^= 3,
            |c: &mut ExperimentConfig| c.client_use_scores = !c.client_use_scores,
            |c: &mut ExperimentConfig| c.client_relative_weights = !c.client_relative_weights,
            |c: &mut ExperimentConfig| c.prior_correction = !c.prior_correction,
        ] {
            flip(&mut now);
            assert_eq!(
                stale_variants(&prev, &now),
                Some(vec![Variant::CrosslmFrozenLlm, Variant::Crosslm])
            );
            flip(&mut now);
        }
        // Another experiment altogether: nothing is kept.
        now.per_client += 1;
        assert_eq!(stale_variants(&prev, &now), None);
    }
}
