#!/usr/bin/env bash
# Installs what the Kotlin binding test needs (bindings/tests/kotlin/run.sh), idempotently,
# outside the checkout, and prints it as shell assignments for `eval`:
#   KOTLIN_HOME=...   the Kotlin compiler distribution (bin/kotlinc)
#   KOTLIN_CP=...     jna.jar : kotlinx-coroutines-core-jvm.jar : kotlin-stdlib.jar
# Sources (only package registries are reachable here):
#   - the npm registry's package `kotlin-compiler` (JetBrains' full compiler distribution:
#     kotlinc for the JVM, kotlin-stdlib, and kotlinx-coroutines-core-jvm in lib/), pinned to
#     one version and its sha512;
#   - Debian's libjna-java (JNA 5.x, with libjnidispatch from libjna-jni), installed with
#     apt-get when missing (needs root);
#   - a Java runtime >= 11 (`java`), from Debian's openjdk-17-jre-headless when missing.
# Env: CROSSLM_KOTLIN_DIR (default ~/.cache/crosslm/kotlin).
set -euo pipefail

KOTLIN_VERSION=2.4.20
KOTLIN_SHA512=IF5IVM7LpPhA/ntHQQpaVt1yxpaaQovtEVYLyqWMuaLr0XelLPPm7/sM6HLhtcRjjjoSsK7I7lP2kzYJkMy73w==
DIR="${CROSSLM_KOTLIN_DIR:-$HOME/.cache/crosslm/kotlin}"
HOME_DIR="$DIR/kotlinc-$KOTLIN_VERSION"
JNA=/usr/share/java/jna.jar

say() { echo "kotlin-toolchain: $*" >&2; }
die() { say "$*"; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "missing $*: install it (apt-get install $*) or run this as root"
  say "apt-get install $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

# Java runtime.
command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
[ "${java_major:-0}" -ge 11 ] || die "java $java_major is too old: need >= 11"

# JNA (Debian).
[ -f "$JNA" ] || apt_install libjna-java
jna_version=$(basename "$(readlink -f "$JNA")" .jar); jna_version=${jna_version#jna-}
[ "${jna_version%%.*}" -ge 5 ] 2>/dev/null || die "$JNA is JNA '${jna_version:-?}': need >= 5"

# Kotlin compiler (npm), unpacked once into $HOME_DIR.
if [ ! -x "$HOME_DIR/bin/kotlinc" ] || [ "$(cat "$HOME_DIR/build.txt" 2>/dev/null)" != "$KOTLIN_VERSION" ]; then
  command -v npm >/dev/null 2>&1 || die "npm is needed to fetch kotlin-compiler $KOTLIN_VERSION (Debian: apt-get install npm)"
  mkdir -p "$DIR"
  tmp=$(mktemp -d "$DIR/.install.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  say "fetching kotlin-compiler@$KOTLIN_VERSION from the npm registry"
  # A private npm cache: the 90 MB tarball is kept only as the unpacked install.
  (cd "$tmp" && npm pack --silent --cache "$tmp/npm-cache" "kotlin-compiler@$KOTLIN_VERSION" >/dev/null)
  tgz="$tmp/kotlin-compiler-$KOTLIN_VERSION.tgz"
  [ -f "$tgz" ] || die "npm pack left no $tgz"
  got=$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)
  [ "$got" = "$KOTLIN_SHA512" ] || die "kotlin-compiler-$KOTLIN_VERSION.tgz: sha512 $got, expected $KOTLIN_SHA512"
  tar xzf "$tgz" -C "$tmp"
  # The JS/Wasm klibs and the -sources jars are not needed for the JVM.
  rm -f "$tmp"/package/lib/*-sources.jar "$tmp"/package/lib/*.klib
  [ "$(cat "$tmp/package/build.txt")" = "$KOTLIN_VERSION" ] || die "unexpected build.txt in the tarball"
  rm -rf "$HOME_DIR"
  mv "$tmp/package" "$HOME_DIR"
  rm -rf "$tmp"
  trap - EXIT
  say "installed Kotlin $KOTLIN_VERSION in $HOME_DIR ($(du -sh "$HOME_DIR" | cut -f1))"
fi
for f in "$HOME_DIR/lib/kotlinx-coroutines-core-jvm.jar" "$HOME_DIR/lib/kotlin-stdlib.jar"; do
  [ -f "$f" ] || die "missing $f"
done

printf 'KOTLIN_HOME=%q\n' "$HOME_DIR"
printf 'KOTLIN_CP=%q\n' "$JNA:$HOME_DIR/lib/kotlinx-coroutines-core-jvm.jar:$HOME_DIR/lib/kotlin-stdlib.jar"
