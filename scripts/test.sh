#!/usr/bin/env bash
# Runs every test: fetches assets, builds once in release (the one profile), tests the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
# The network tests drive the real binaries (e.g. SIGKILL the coordinator): build them first.
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
