//! The coordinator LLM (SmolLM2 / Llama) in burn.
