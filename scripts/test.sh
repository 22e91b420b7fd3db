#!/usr/bin/env bash
# Runs every test: fetches assets, builds once in release (the one profile), tests the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
# The network tests drive the real binaries (e.g. SIGKILL the coordinator), and the binding
# tests the crosslm-ffi library (`--lib` puts a fresh one in target/release): build them first.
cargo build --release --workspace --lib --bins --examples
cargo test --release --workspace "$@"
# The mobile bindings for real: generate Kotlin/Swift/Python from the built library, then drive
# a coordinator on loopback through the Python module (system python3, unittest).
./scripts/bindings.sh > /dev/null
python3 bindings/tests/test_python.py
# Kotlin on the JVM (JNA) against a real coordinator; its toolchain (Kotlin from the npm
# registry, Debian's libjna-java) is installed once by scripts/kotlin-toolchain.sh.
bindings/tests/kotlin/run.sh
# Swift: no Swift compiler on Linux; the C header, module map and checksums against the library.
bindings/tests/swift/check.sh
