# Shared settings for the project's scripts (sourced).
# One target dir outside the checkout, so CI and every script reuse one release build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/crosslm/target}"
export CROSSLM_ASSETS="${CROSSLM_ASSETS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/assets}"
# lavapipe (software Vulkan for the wgpu tests) complains without a runtime dir.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
