//! On-device small language models: MiniLM classifier and a light model.
