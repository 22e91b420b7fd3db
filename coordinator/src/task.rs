//! Task specifications (labels, prompt templates).
