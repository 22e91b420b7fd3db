//! Checkpoint directories: `model.bpk` (burn record), `tokenizer.json`, `meta.json`.

use std::path::Path;

use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};

use super::{
    Arch, ArchConfig, Backend, BagClassifier, Classifier, MiniLmClassifier, Slm, TextClassifier,
    TextTokenizer, TrainConfig,
};
use crate::{Error, Result};

const FORMAT: u32 = 1;
const META: &str = "meta.json";
const WEIGHTS: &str = "model.bpk";
const TOKENIZER: &str = "tokenizer.json";

/// What `meta.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Checkpoint format version.
    pub format: u32,
    /// Architecture.
    pub arch: Arch,
    /// Label names in output order.
    pub labels: Vec<String>,
    /// Tokenizer truncation length.
    pub max_len: usize,
    /// Architecture configuration.
    pub config: ArchConfig,
    /// The configuration of the last training run, if any.
    pub train: Option<TrainConfig>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `slm` to `dir` (created if needed). `meta.json` is written last, so a directory whose
/// save was interrupted does not look like a checkpoint.
pub(crate) fn save<M: Classifier>(slm: &TextClassifier<M>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(dir.join(META));
    slm.model
        .clone()
        .into_record()
        .save(dir.join(WEIGHTS))
        .map_err(|e| Error::Model(format!("{}: {e}", dir.join(WEIGHTS).display())))?;
    write(&dir.join(TOKENIZER), slm.tokenizer.to_json()?.as_bytes())?;
    let meta = CheckpointMeta {
        format: FORMAT,
        arch: slm.config.arch(),
        labels: slm.labels.clone(),
        max_len: slm.tokenizer.max_len(),
        config: slm.config.clone(),
        train: slm.last_train.clone(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Model(e.to_string()))?;
    write(&dir.join(META), &json)
}

/// Reads and checks `meta.json`.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(|source| Error::File {
        path: path.clone(),
        source,
    })?;
    let meta: CheckpointMeta = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Model(format!("corrupt checkpoint {}: {META}: {e}", dir.display())))?;
    if meta.format != FORMAT || meta.arch != meta.config.arch() || meta.labels.is_empty() {
        return Err(Error::Model(format!(
            "corrupt checkpoint {}: {META} has format {}, arch {} with {} config, {} labels",
            dir.display(),
            meta.format,
            meta.arch,
            meta.config.arch(),
            meta.labels.len()
        )));
    }
    Ok(meta)
}

/// Rebuilds the module from its configuration and loads the weights into it.
fn load_typed<M: Classifier>(
    dir: &Path,
    meta: CheckpointMeta,
    backend: Backend,
    build: impl FnOnce(&ArchConfig, usize, &burn::tensor::Device) -> Result<M>,
) -> Result<TextClassifier<M>> {
    let device = backend.device()?;
    let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER), meta.max_len)?;
    let corrupt =
        |what: String| Error::Model(format!("corrupt checkpoint {}: {what}", dir.display()));
    let weights = dir.join(WEIGHTS);
    if !weights.is_file() {
        return Err(corrupt(format!("{WEIGHTS} is missing")));
    }
    let record = ModuleRecord::load(&weights).map_err(|e| corrupt(format!("{WEIGHTS}: {e}")))?;
    let model = build(&meta.config, meta.labels.len(), &device)?
        .try_load_record(record)
        .map_err(|e| corrupt(format!("{WEIGHTS} does not fit the model: {e}")))?;
    let mut slm = TextClassifier::from_parts(model, tokenizer, meta.labels, meta.config, device);
    slm.last_train = meta.train;
    Ok(slm)
}

/// Loads any checkpoint written by [`Slm::save`].
pub fn load_checkpoint(dir: &Path, backend: Backend) -> Result<Box<dyn Slm>> {
    let meta = read_meta(dir)?;
    Ok(match meta.arch {
        Arch::Minilm => Box::new(load_typed(
            dir,
            meta,
            backend,
            |cfg, n, device| match cfg {
                ArchConfig::Minilm(c) => Ok(MiniLmClassifier::new(c.init(device), c, n, device)),
                _ => Err(Error::Model("arch/config mismatch".into())),
            },
        )?),
        Arch::Bag => Box::new(load_typed::<BagClassifier>(
            dir,
            meta,
            backend,
            |cfg, n, device| match cfg {
                ArchConfig::Bag(c) => c.init(n, device),
                _ => Err(Error::Model("arch/config mismatch".into())),
            },
        )?),
    })
}

/// Replacing a checkpoint so that one whole checkpoint exists at every moment: a new one is
/// written beside it (`dir.new`), then swapped in by renames, and an interrupted swap is undone
/// on the next start.
pub mod swap {
    use std::path::{Path, PathBuf};

    use crate::slm::Slm;
    use crate::{Error, Result};

    fn swap_err(dir: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::Checkpoint {
            dir: dir.to_path_buf(),
            reason: format!("replacing it failed: {e}"),
        }
    }

    /// `dir` with `.suffix` appended to its last component.
    pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
        let dir: PathBuf = dir.components().collect();
        let mut s = dir.into_os_string();
        s.push(".");
        s.push(suffix);
        PathBuf::from(s)
    }

    /// Whether `dir` holds a whole checkpoint (its metadata is written last).
    pub fn is_checkpoint(dir: &Path) -> bool {
        dir.join(super::META).is_file()
    }

    /// Replaces the checkpoint `dir` by `dir.new`: rename the old one aside, the new one in, then
    /// delete the old one, so that at any moment one whole checkpoint exists (see [`recover`]).
    pub fn commit(dir: &Path) -> Result<()> {
        let new = sibling(dir, "new");
        if !is_checkpoint(&new) {
            return Ok(());
        }
        let old = sibling(dir, "old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(swap_err(dir))?;
        }
        std::fs::rename(&new, dir).map_err(swap_err(dir))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Undoes an interrupted [`commit`].
    pub fn recover(dir: &Path) -> Result<()> {
        let old = sibling(dir, "old");
        if !is_checkpoint(dir) && is_checkpoint(&old) {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::rename(&old, dir).map_err(swap_err(dir))?;
            tracing::warn!(checkpoint = %dir.display(), "restored the previous checkpoint after an interrupted save");
        }
        Ok(())
    }

    /// Writes `slm` as `dir.new`, then swaps it in with [`commit`].
    pub fn save(slm: &dyn Slm, dir: &Path) -> Result<()> {
        let new = sibling(dir, "new");
        let _ = std::fs::remove_dir_all(&new);
        slm.save(&new).map_err(|e| Error::Checkpoint {
            dir: dir.to_path_buf(),
            reason: format!("writing the new one failed: {e}"),
        })?;
        commit(dir)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checkpoint_swap_keeps_one_whole_checkpoint() {
            let dir = tempfile::tempdir().unwrap();
            let ck = dir.path().join("ckpt");
            let write = |d: &Path, tag: &str| {
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(d.join("meta.json"), tag).unwrap();
            };
            write(&ck, "v1");
            write(&sibling(&ck, "new"), "v2");
            commit(&ck).unwrap();
            assert_eq!(std::fs::read_to_string(ck.join("meta.json")).unwrap(), "v2");
            assert!(!sibling(&ck, "new").exists() && !sibling(&ck, "old").exists());
            // Interrupted between the two renames: the old one comes back.
            std::fs::rename(&ck, sibling(&ck, "old")).unwrap();
            recover(&ck).unwrap();
            assert_eq!(std::fs::read_to_string(ck.join("meta.json")).unwrap(), "v2");
            assert_eq!(sibling(Path::new("a/b/"), "new"), PathBuf::from("a/b.new"));
        }

        #[test]
        fn a_failed_swap_is_a_checkpoint_error_and_keeps_the_old_one() {
            let dir = tempfile::tempdir().unwrap();
            let ck = dir.path().join("ckpt");
            for d in [ck.clone(), sibling(&ck, "new")] {
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("meta.json"), "x").unwrap();
            }
            // A plain file where the old one would be set aside: the first rename fails.
            std::fs::write(sibling(&ck, "old"), "in the way").unwrap();
            let err = commit(&ck).unwrap_err();
            assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
            assert!(err.to_string().contains("ckpt"), "{err}");
            assert!(is_checkpoint(&ck));
        }
    }
}
