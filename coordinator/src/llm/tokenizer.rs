//! The LLM's tokenizer, built from GGUF metadata with the HF `tokenizers` crate, and the
//! ChatML chat template.
//!
//! GGUF stores a GPT-2 style byte-level BPE as `tokenizer.ggml.tokens` + `.merges`;
//! `tokenizer.ggml.pre` names how text is split before BPE: `smollm` splits every digit on
//! its own before the GPT-2 regex, `qwen2` uses Qwen2's own regex (single digits, letters
//! with one leading non-letter, punctuation runs). Tokens of type control or user-defined
//! (`<|im_start|>`, ...) are special: matched in the text as whole tokens, never merged.

use tokenizers::SplitDelimiterBehavior;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use super::gguf::{Gguf, MetaValue};
use crate::{Error, Result};

/// `tokenizer.ggml.token_type` values of special tokens: control and user-defined.
const SPECIAL_TYPES: [u64; 2] = [3, 4];

/// Qwen2's pre-tokenizer regex (its `tokenizer.json`, and llama.cpp's `qwen2` pre-type).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A chat message for [`Tokenizer::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Byte-level BPE tokenizer plus the model's special tokens and chat template.
pub struct Tokenizer {
    inner: HfTokenizer,
    /// Beginning-of-sequence id (`<|im_start|>` in SmolLM2).
    pub bos_id: u32,
    /// End-of-sequence id (`<|im_end|>`): generation stops here.
    pub eos_id: u32,
    /// Whether prompts should start with BOS (false for SmolLM2).
    pub add_bos: bool,
    /// The system prompt the ChatML template inserts when a conversation has none.
    default_system: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        let model = gguf.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.model = {model}: only gpt2 (byte-level BPE) is supported"
            )));
        }
        let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let tokens = gguf.meta_str_array("tokenizer.ggml.tokens")?;
        let merges = gguf.meta_str_array("tokenizer.ggml.merges")?;
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let special: Vec<&str> = match gguf.meta("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(types)) if types.len() == tokens.len() => tokens
                .iter()
                .zip(types)
                .filter(|(_, t)| t.as_u64().is_some_and(|t| SPECIAL_TYPES.contains(&t)))
                .map(|(tok, _)| *tok)
                .collect(),
            _ => {
                return Err(Error::Tokenizer(
                    "tokenizer.ggml.token_type is missing or not one type per token".into(),
                ));
            }
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            // SmolLM2: each digit on its own, then the GPT-2 regex.
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ])),
            // Qwen2: its regex, then bytes mapped to characters (no second regex).
            "qwen2" => {
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| Error::Tokenizer(format!("qwen2 pre-tokenizer: {e}")))?;
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                ]))
            }
            "gpt2" | "default" => byte_level,
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported tokenizer.ggml.pre = {other}"
                )));
            }
        };
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let added: Vec<AddedToken> = special
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<u32> {
            let v = gguf.meta_u64(key)?;
            u32::try_from(v)
                .ok()
                .filter(|&v| (v as usize) < tokens.len())
                .ok_or_else(|| Error::Tokenizer(format!("{key} = {v} is not a token id")))
        };
        let template = gguf.meta_str("tokenizer.chat_template").ok();
        let default_system = match template {
            Some(t) if !t.contains("<|im_start|>") => {
                return Err(Error::Tokenizer(
                    "the embedded chat template is not ChatML (no <|im_start|>)".into(),
                ));
            }
            Some(t) => default_system_prompt(t),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            add_bos: gguf
                .meta("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            default_system,
        })
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text to ids. Special-token strings in the text are recognized as special tokens;
    /// BOS is prepended only when the model asks for it (`add_bos`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.push(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, keeping special tokens when `skip_special` is false.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
    }

    /// The text of one token (as stored in the vocabulary, byte-level encoded).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Renders a conversation with the model's ChatML template: a default system message is
    /// inserted when the first message is not `system`, and with `add_generation_prompt` the
    /// text ends with `<|im_start|>assistant\n` so the model answers next.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> String {
        let mut out = String::new();
        if let (Some(system), Some(first)) = (&self.default_system, messages.first())
            && first.role != "system"
        {
            out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }

    /// Shorthand: one user message rendered as a chat prompt ready for the answer.
    pub fn chat_prompt(&self, user: &str) -> String {
        self.apply_chat_template(&[ChatMessage::new("user", user)], true)
    }
}

/// Finds the default system prompt inside a ChatML Jinja template: the first
/// `<|im_start|>system` + newline + `...<|im_end|>` whose text is a literal (no Jinja code such as
/// `' + messages[0]['content'] + '` in it), if there is one.
fn default_system_prompt(template: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    template.match_indices(START).find_map(|(i, _)| {
        // The newline is a real one, or `\n` inside a Jinja string literal.
        let rest = &template[i + START.len()..];
        let rest = rest
            .strip_prefix('\n')
            .or_else(|| rest.strip_prefix("\\n"))?;
        let text = &rest[..rest.find("<|im_end|>")?];
        let code = ["{", "}", "' +", "+ '"].iter().any(|c| text.contains(c));
        (!code).then(|| text.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::test_assets;

    fn tokenizer() -> Result<Tokenizer> {
        Tokenizer::from_gguf(&Gguf::open(test_assets::smollm2_path())?)
    }

    #[test]
    fn finds_the_default_system_prompt() {
        let t = "{{ '<|im_start|>system\nBe nice<|im_end|>\n' }}";
        assert_eq!(default_system_prompt(t).as_deref(), Some("Be nice"));
        assert_eq!(default_system_prompt("{{ x }}"), None);
        // Qwen2.5's template: code first, the literal default in its else branch.
        let qwen = r"{{- '<|im_start|>system\n' }}{%- if x %}{{- '<|im_start|>system\n' +
                    messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{-
                    '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}";
        assert_eq!(
            default_system_prompt(qwen).as_deref(),
            Some("You are Qwen.")
        );
    }

    /// Encode/decode against the reference examples of `smollm2_reference.json`.
    #[test]
    fn matches_reference_tokenization() -> Result<()> {
        let tok = tokenizer()?;
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!((tok.bos_id, tok.eos_id, tok.add_bos), (1, 2, false));
        let examples: [(&str, &[u32]); 2] = [
            (
                "Hello world! 123 This movie was great.",
                &[19556, 905, 17, 216, 33, 34, 35, 669, 7704, 436, 1109, 30],
            ),
            ("<|im_start|>user\nhi<|im_end|>", &[1, 4093, 198, 6004, 2]),
        ];
        for (text, ids) in examples {
            assert_eq!(tok.encode(text)?, ids, "{text:?}");
            assert_eq!(tok.decode(ids, false)?, text);
        }
        Ok(())
    }

    #[test]
    fn chat_template_matches_reference_prompt() -> Result<()> {
        let tok = tokenizer()?;
        let prompt = tok.chat_prompt("Write a one-sentence negative review of a movie.");
        let expected: &[u32] = &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 582, 29, 28205, 3524, 2523, 282,
            253, 7704, 30, 2, 198, 1, 520, 9531, 198,
        ];
        assert_eq!(tok.encode(&prompt)?, expected);
        // An explicit system message replaces the default one.
        let custom = tok.apply_chat_template(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ],
            false,
        );
        assert_eq!(
            custom,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
        Ok(())
    }
}
