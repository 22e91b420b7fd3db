//! Cross-crate and network integration tests; see `tests/`.
