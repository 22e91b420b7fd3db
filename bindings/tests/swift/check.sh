#!/usr/bin/env bash
# Checks the generated Swift bindings as far as Linux allows: there is no Swift compiler here
# (none in Debian bookworm, PyPI or the npm registry), so CrossLm.swift itself is not compiled.
# What is checked, from the files scripts/bindings.sh wrote and the built library:
#   - the module map names a header that exists, and its module is the one CrossLm.swift imports;
#   - the C header compiles on its own and included twice: with cc (gcc) as C11 and g++ as C++17
#     (clang's _Nullable defined away), and with clang as C11, C++17 and Objective-C;
#   - clang builds the module from the module map (`@import` in Objective-C, `#include` in C
#     with -fmodules), the way Swift's Clang importer loads it;
#   - every FFI function that CrossLm.swift calls is declared in the header, and every function
#     the header declares is exported by libcrosslm_ffi.so;
#   - a C program linked against libcrosslm_ffi.so runs the check CrossLm.swift does at first
#     use: the contract version and every API checksum that the Swift file expects.
#   bindings/tests/swift/check.sh   (after cargo build --release --workspace and scripts/bindings.sh)
# Needs cc, c++, nm, python3 and clang (Debian: apt-get install --no-install-recommends clang-14).
# Env: CARGO_TARGET_DIR, CROSSLM_BINDINGS (default $CARGO_TARGET_DIR/bindings), CROSSLM_LIB_DIR
# (where libcrosslm_ffi.so is; default $CARGO_TARGET_DIR/release). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. scripts/env.sh
GEN="${CROSSLM_BINDINGS:-$CARGO_TARGET_DIR/bindings}/swift"
LIB_DIR="${CROSSLM_LIB_DIR:-$CARGO_TARGET_DIR/release}"
LIB="$LIB_DIR/libcrosslm_ffi.so"
[ -d "$GEN" ] || { echo "no generated Swift in $GEN: run scripts/bindings.sh" >&2; exit 1; }
[ -f "$LIB" ] || { echo "missing $LIB: run cargo build --release --workspace" >&2; exit 1; }
CLANG=$(command -v clang || command -v clang-14 || true)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; [ ! -s "$WORK/err" ] || sed 's/^/     /' "$WORK/err" | head -20; }
# run NAME CMD...: one check; its output is shown only when it fails.
run() {
  local name=$1; shift
  if "$@" >"$WORK/err" 2>&1; then ok "$name"; else fail "$name"; fi
}
one() { # the single file in $GEN matching a glob
  local f=("$GEN"/$1)
  [ "${#f[@]}" = 1 ] && [ -f "${f[0]}" ] || { echo "expected one $1 in $GEN, found: ${f[*]}" >&2; exit 1; }
  echo "${f[0]}"
}
SWIFT=$(one '*.swift')
MAP=$(one '*.modulemap')

# The module map and the Swift file agree.
MODULE=$(sed -n 's/^ *module \([A-Za-z_][A-Za-z0-9_]*\) *{.*/\1/p' "$MAP")
HEADERS=$(sed -n 's/^ *header "\(.*\)".*/\1/p' "$MAP")
: >"$WORK/err"
if [ -n "$HEADERS" ] && [ "$(echo "$HEADERS" | wc -l)" = 1 ] && [ -f "$GEN/$HEADERS" ]; then
  ok "modulemap names an existing header ($HEADERS)"
else
  echo "header lines: '${HEADERS}' in $MAP; files: $(ls "$GEN")" >"$WORK/err"; fail "modulemap names an existing header"
fi
HEADER="$GEN/$HEADERS"
if [ ! -f "$HEADER" ]; then
  echo "swift: $passed passed, $failed failed (stopped: no header to check)"
  exit 1
fi
# Swift imports: everything but the system modules.
IMPORTS=$(sed -n 's/^ *import \([A-Za-z_][A-Za-z0-9_]*\).*/\1/p' "$SWIFT" | grep -vxE 'Foundation|Darwin|Glibc|Dispatch' | sort -u || true)
CAN_IMPORT=$(sed -n 's/^ *#if canImport(\([A-Za-z0-9_]*\)).*/\1/p' "$SWIFT" | sort -u)
if [ -n "$MODULE" ] && [ "$IMPORTS" = "$MODULE" ] && [ "$CAN_IMPORT" = "$MODULE" ]; then
  ok "module $MODULE is what $(basename "$SWIFT") imports"
else
  echo "modulemap module: '$MODULE'; Swift imports: '$IMPORTS'; canImport: '$CAN_IMPORT'" >"$WORK/err"
  fail "module name is what $(basename "$SWIFT") imports"
fi

# The header compiles, included twice (include guards), in each language a Swift app's target
# may mix in.
{
  printf '#include "%s"\n#include "%s"\n' "$HEADER" "$HEADER"
  printf 'int main(void) { return (int)sizeof(RustBuffer) == 0; }\n'
} >"$WORK/tu.c"
cp "$WORK/tu.c" "$WORK/tu.cpp"
cp "$WORK/tu.c" "$WORK/tu.m"
STRICT=(-Wall -Wextra -Werror -pedantic)
# gcc knows no _Nullable (a clang extension the header uses for Swift's optionals).
NO_NULLABILITY=(-D_Nullable= -D_Nonnull= -D_Null_unspecified=)
run "cc -fsyntax-only (C11)" cc -fsyntax-only -std=c11 "${STRICT[@]}" "${NO_NULLABILITY[@]}" "$WORK/tu.c"
run "c++ -fsyntax-only (C++17)" c++ -fsyntax-only -std=c++17 "${STRICT[@]}" "${NO_NULLABILITY[@]}" "$WORK/tu.cpp"
if [ -n "$CLANG" ]; then
  CL_STRICT=("${STRICT[@]}" -Wno-nullability-extension)
  run "clang -fsyntax-only (C11)" "$CLANG" -fsyntax-only -x c -std=c11 "${CL_STRICT[@]}" "$WORK/tu.c"
  run "clang -fsyntax-only (C++17)" "$CLANG" -fsyntax-only -x c++ -std=c++17 "${CL_STRICT[@]}" "$WORK/tu.cpp"
  run "clang -fsyntax-only (Objective-C)" "$CLANG" -fsyntax-only -x objective-c "${CL_STRICT[@]}" "$WORK/tu.m"
  # The module, built from the module map, as Swift's Clang importer does.
  printf '@import %s;\nint main(void) { return (int)ffi_crosslm_ffi_uniffi_contract_version() == 0; }\n' "$MODULE" >"$WORK/mod.m"
  run "clang builds module $MODULE from the modulemap (@import)" "$CLANG" -fsyntax-only -fmodules \
    -fmodule-map-file="$MAP" -fmodules-cache-path="$WORK/modules" -Wall -Werror "$WORK/mod.m"
  printf '#include "%s"\nint main(void) { return (int)ffi_crosslm_ffi_uniffi_contract_version() == 0; }\n' "$(basename "$HEADER")" >"$WORK/mod.c"
  # -Rmodule-build tells that the #include became the module (a fresh cache, so it is built).
  if "$CLANG" -fsyntax-only -fmodules -fmodule-map-file="$MAP" -fmodules-cache-path="$WORK/modules-c" \
      -I"$GEN" -Wall -Werror -Rmodule-build "$WORK/mod.c" >"$WORK/err" 2>&1 \
      && grep -q "finished building module '$MODULE'" "$WORK/err"; then
    ok "clang -fmodules maps the header to module $MODULE (C #include)"
  else
    fail "clang -fmodules maps the header to module $MODULE (C #include)"
  fi
else
  : >"$WORK/err"
  fail "clang not found: the Objective-C and module checks need it (apt-get install --no-install-recommends clang-14)"
fi

# Symbols: what the Swift file calls is declared; what the header declares, the library exports.
grep -oE '\b(uniffi|ffi)_crosslm_ffi_[A-Za-z0-9_]+' "$SWIFT" | sort -u >"$WORK/swift.syms"
grep -oE '\b(uniffi|ffi)_crosslm_ffi_[A-Za-z0-9_]+\(' "$HEADER" | tr -d '(' | sort -u >"$WORK/header.syms"
nm -D --defined-only "$LIB" | awk '{print $NF}' | grep -E '^(uniffi|ffi)_crosslm_ffi_' | sort -u >"$WORK/lib.syms"
comm -23 "$WORK/swift.syms" "$WORK/header.syms" >"$WORK/err"
if [ -s "$WORK/swift.syms" ] && [ ! -s "$WORK/err" ]; then
  ok "all $(wc -l <"$WORK/swift.syms") FFI functions the Swift file calls are declared in the header"
else
  fail "FFI functions the Swift file calls but the header lacks (above)"
fi
comm -23 "$WORK/header.syms" "$WORK/lib.syms" >"$WORK/err"
if [ -s "$WORK/header.syms" ] && [ ! -s "$WORK/err" ]; then
  ok "all $(wc -l <"$WORK/header.syms") functions of the header are exported by $(basename "$LIB")"
else
  fail "functions the header declares but $(basename "$LIB") does not export (above)"
fi

# The Swift file's start-up check, in C against the real library: contract version and checksums.
python3 - "$SWIFT" "$HEADER" "$WORK/init.c" >"$WORK/err" 2>&1 <<'EOF' || fail "extract the Swift file's contract version and checksums"
import re, sys
swift, header, out = sys.argv[1:]
src = open(swift).read()
version = re.findall(r"let bindings_contract_version = (\d+)", src)
sums = re.findall(r"if \((uniffi_\w+_checksum_\w+)\(\) != (\d+)\)", src)
declared = set(re.findall(r"\b(uniffi_\w+_checksum_\w+)\(", open(header).read()))
if len(version) != 1 or not sums or {s for s, _ in sums} != declared:
    sys.exit(f"contract version {version}; {len(sums)} checksums in the Swift file, "
             f"{len(declared)} checksum functions in the header; "
             f"differ: {sorted({s for s, _ in sums} ^ declared)}")
lines = ['#include <stdio.h>', f'#include "{header}"', "int main(void) {", "  int bad = 0;",
         f"  if (ffi_crosslm_ffi_uniffi_contract_version() != {version[0]}u) {{",
         f'    printf("contract version %u, Swift expects {version[0]}\\n", '
         "(unsigned)ffi_crosslm_ffi_uniffi_contract_version()); bad++; }"]
for name, value in sums:
    lines += [f"  if ({name}() != {value}) {{",
              f'    printf("{name}: %u, Swift expects {value}\\n", (unsigned){name}()); bad++; }}']
lines += [f'  printf("%d of {len(sums) + 1} differ\\n", bad);', "  return bad != 0;", "}"]
open(out, "w").write("\n".join(lines) + "\n")
EOF
if [ -f "$WORK/init.c" ]; then
  n=$(grep -c '^  if (uniffi_' "$WORK/init.c" || true)
  if cc -std=c11 "${NO_NULLABILITY[@]}" -o "$WORK/init" "$WORK/init.c" -L"$LIB_DIR" -lcrosslm_ffi \
      -Wl,-rpath,"$LIB_DIR" >"$WORK/err" 2>&1 && "$WORK/init" >"$WORK/err" 2>&1; then
    ok "the library matches the Swift file's contract version and $n API checksums"
  else
    fail "the Swift file's contract version and checksums against $(basename "$LIB")"
  fi
fi

echo "swift: $passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
