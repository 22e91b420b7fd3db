#!/usr/bin/env bash
# Compiles the generated Kotlin bindings with Smoke.kt and runs it on the JVM through JNA.
# Needs kotlinc >= 1.6 (uniffi 0.32's Kotlin uses trailing commas, stackTraceToString) and
# jna.jar + kotlinx-coroutines-core >= 1.6 (DelicateCoroutinesApi); set CP to those jars.
# Debian bookworm's kotlin 1.3.31 and kotlinx-coroutines 1.0.1 are too old, so this is not in
# CI and has not passed here (see bindings/README.md).
set -euo pipefail
cd "$(dirname "$0")/../../.."
. scripts/env.sh
GEN="${CROSSLM_BINDINGS:-$CARGO_TARGET_DIR/bindings}/kotlin"
[ -d "$GEN" ] || { echo "no generated Kotlin in $GEN: run scripts/bindings.sh" >&2; exit 1; }
CP="${CP:-/usr/share/java/jna.jar:/usr/share/java/kotlinx-coroutines-core.jar}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
kotlinc -nowarn -cp "$CP" -d "$WORK/smoke.jar" $(find "$GEN" -name '*.kt') bindings/tests/kotlin/Smoke.kt
kotlin -cp "$CP:$WORK/smoke.jar" -Djna.library.path="$CARGO_TARGET_DIR/release" SmokeKt "$WORK"
