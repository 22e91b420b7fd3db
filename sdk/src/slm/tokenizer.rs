//! WordPiece tokenization through the HF `tokenizers` crate, padded per batch.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::{Error, Result};

/// The tokenizer of an SLM: `tokenizer.json` with the file's fixed padding switched off (a batch
/// is padded to its own longest text, not to 128) and truncation at `max_len` tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_len: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, truncating at `max_len` tokens (special tokens included).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, max_len)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8], max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::Tokenizer(format!(
                "max_len {max_len} leaves no room for text"
            )));
        }
        let mut inner = Tokenizer::from_bytes(json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        // The padding id comes from the file's own padding block if it has one.
        let pad_id = inner.get_padding().map_or(0, |p: &PaddingParams| p.pad_id);
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            pad_id,
            max_len,
        })
    }

    /// The tokenizer as `tokenizer.json` text (what a checkpoint stores).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Truncation length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]`, truncated, unpadded.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// A padded batch on a device: ids `[B, T]` and mask `[B, T]` (1 for tokens, 0 for padding),
/// with `T` the longest sequence in the batch.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids.
    pub ids: Tensor<2, Int>,
    /// 1.0 on tokens, 0.0 on padding.
    pub mask: Tensor<2>,
}

impl TokenBatch {
    /// Pads `seqs` to the longest one with `pad_id`.
    pub fn new(seqs: &[&[u32]], pad_id: u32, device: &Device) -> Self {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id as i64; b * t];
        let mut mask = vec![0f32; b * t];
        for (row, seq) in seqs.iter().enumerate() {
            for (col, &id) in seq.iter().enumerate() {
                ids[row * t + col] = i64::from(id);
                mask[row * t + col] = 1.0;
            }
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [b, t]), device),
            mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assets_dir;

    #[test]
    fn no_fixed_padding_and_truncation() {
        let path = assets_dir().join("minilm/tokenizer.json");
        let tok = TextTokenizer::from_file(&path, 8).unwrap();
        let ids = tok
            .encode(&[
                "A man is eating food.",
                "hi",
                "one two three four five six seven eight",
            ])
            .unwrap();
        assert_eq!(ids[0], vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
        assert_eq!(ids[1].len(), 3);
        assert_eq!(ids[2].len(), 8);
        assert_eq!(*ids[2].last().unwrap(), 102);
        assert!(TextTokenizer::from_bytes(b"{not json", 8).is_err());
    }
}
