#!/usr/bin/env bash
# The main job, end to end on loopback: fetch assets, build, then run CrossLM on MR with the
# small demo profile (examples/experiments/demo.toml): 4 clients (2 MiniLM, 2 light bag
# models) with 64 private sentences each, 3 rounds. A real coordinator daemon (SmolLM2
# generating label-conditioned samples, LoRA-tuned on the clients' feedback between rounds)
# and real clients (enrollment, mutual TLS, QUIC) run on 127.0.0.1; each client scores every
# sample, trains on its private data plus the scored samples, and reports its test accuracy.
# Also runs the Standalone baseline (private data only) and prints the table: SLM accuracy
# standalone vs CrossLM, LLM zero-shot vs tuned, LLM perplexity before/after.
# Results: results/demo/{results.md,metrics.json,accuracy.png,run.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/crosslm-experiment" run \
  --config examples/experiments/demo.toml --out results --fresh "$@"
