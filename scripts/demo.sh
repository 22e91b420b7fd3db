#!/usr/bin/env bash
# The main job, end to end on loopback: fetch assets, build, split MR across 4 clients
# (2 MiniLM, 2 light bag models), train each SLM on its private slice, start the
# coordinator (SmolLM2 generating label-conditioned samples), and let the clients enroll
# and take part in 2 rounds over QUIC + mutual TLS: each client scores the samples, and after
# each round trains on its private data plus the scored samples (weighted by aggregated
# quality, soft labels) and reports its test accuracy. Prints the rounds and accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
cargo build --release --workspace --bins
B="$CARGO_TARGET_DIR/release"
RUN=demo-run
rm -rf "$RUN"; mkdir -p "$RUN"
CLIENTS=4

echo "== partition MR across $CLIENTS clients (64 private examples each)"
"$B/crosslm-client" data partition --data "$CROSSLM_ASSETS/data/mr/movieReviewSnippets_GroundTruth.txt" \
  --clients $CLIENTS --per-client 64 --test-limit 300 --out "$RUN/data"

arch() { if [ "$1" -lt 2 ]; then echo minilm; else echo bag; fi; }
for i in $(seq 0 $((CLIENTS - 1))); do
  echo "== client $i: train $(arch $i) on its private data"
  "$B/crosslm-client" slm train --arch "$(arch $i)" --data "$RUN/data/client-$i.jsonl" \
    --out "$RUN/client-$i/ckpt" --seed "$i"
done

echo "== start the coordinator"
"$B/crosslm-coordinator" serve --config examples/coordinator.toml --print-tokens $CLIENTS \
  --addr-file "$RUN/addr" > "$RUN/tokens.txt" 2> "$RUN/coordinator.log" &
COORD=$!
trap 'kill $COORD 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do [ -s "$RUN/addr" ] && break; sleep 0.5; done
ADDR=$(cat "$RUN/addr")
echo "coordinator on $ADDR (log: $RUN/coordinator.log)"

pids=()
i=0
while read -r _ _ token; do
  "$B/crosslm-client" enroll --coordinator "$ADDR" --token "$token" --data-dir "$RUN/client-$i" --name "client-$i"
  n=$(wc -l < "$RUN/data/client-$i.jsonl")
  "$B/crosslm-client" join --coordinator "$ADDR" --data-dir "$RUN/client-$i" \
    --checkpoint "$RUN/client-$i/ckpt" --n-private "$n" --name "client-$i" --rounds 2 \
    --data "$RUN/data/client-$i.jsonl" --test "$RUN/data/test.jsonl" \
    2> "$RUN/client-$i.log" &
  pids+=($!)
  i=$((i + 1))
done < "$RUN/tokens.txt"
echo "== $CLIENTS clients joined; rounds running (the LLM generates on CPU, be patient)"
for p in "${pids[@]}"; do wait "$p"; done
wait $COORD || true
trap - EXIT

echo "== rounds"
"$B/crosslm-coordinator" status --data-dir "$RUN/coordinator"
echo "== client SLM accuracy on the shared MR test split"
for i in $(seq 0 $((CLIENTS - 1))); do
  printf 'client-%s (%s): ' "$i" "$(arch $i)"
  "$B/crosslm-client" slm eval --checkpoint "$RUN/client-$i/ckpt" --data "$RUN/data/test.jsonl"
done
