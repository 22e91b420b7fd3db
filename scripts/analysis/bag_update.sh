#!/usr/bin/env bash
# Does the per-round update fit its own data? A bag model first trained on label-skewed (1/63)
# or balanced (32/32) MR sentences, then updated on those plus 128 + 128 more real sentences,
# at the old per-round setting (5 epochs, 1e-3) and the new one (15 epochs, 2e-3). Prints the
# last epoch's mean training loss of each update (results/validation/client-bag.md).
# Usage: scripts/analysis/bag_update.sh [WORKDIR]   (needs the release build; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
W=${1:-$(mktemp -d)}
mkdir -p "$W"
C=$CARGO_TARGET_DIR/release/crosslm-client
python3 - "$W" <<'PY'
import json, random, sys
w = sys.argv[1]
rows = []
for line in open("assets/data/mr/movieReviewSnippets_GroundTruth.txt", encoding="utf-8", errors="replace"):
    parts = line.rstrip("\n").split("\t")
    if len(parts) >= 3:
        rows.append((parts[2], "positive" if float(parts[1]) > 0 else "negative"))
random.seed(7)
random.shuffle(rows)
neg = [r for r in rows if r[1] == "negative"]
pos = [r for r in rows if r[1] == "positive"]
extra = neg[100:228] + pos[100:228]
def write(name, rs):
    with open(f"{w}/{name}", "w") as f:
        for t, l in rs:
            f.write(json.dumps({"text": t, "label": l}) + "\n")
for k, (n, p) in {"skew": (1, 63), "bal": (32, 32)}.items():
    write(f"priv-{k}.jsonl", neg[:n] + pos[:p])
    write(f"mix-{k}.jsonl", neg[:n] + pos[:p] + extra)
PY
train() { "$C" slm train --val-fraction 0 --batch-size 16 --max-len 64 "$@" 2>&1 | grep -o "train loss [0-9.]*"; }
for k in skew bal; do
    train --arch bag --out "$W/init-$k" --data "$W/priv-$k.jsonl" --epochs 30 --lr 2e-3 > /dev/null
    for s in "5 1e-3" "15 2e-3"; do
        set -- $s
        echo "$k start, update $1 epochs at $2: $(train --init "$W/init-$k" --out "$W/up-$k-$1" \
            --data "$W/mix-$k.jsonl" --epochs "$1" --lr "$2")"
    done
done
