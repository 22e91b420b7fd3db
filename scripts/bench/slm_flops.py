#!/usr/bin/env python3
"""How much arithmetic the slm bench's scoring is, and what this CPU's sgemm reaches: turns the
bench's samples/s into GFLOP/s so that both sides can be read against the machine's f32 rate.

Counts the forward FLOPs of MiniLM-L6 (6 layers, d 384, ff 1536) over the bench's timed scoring
batches (the MR texts the bench takes, tokenized with the model's tokenizer, truncated to 64,
sorted by length, batches of 32, the first (warm-up) batch left out, as scripts/bench/slm_torch.py
times them), then times torch's sgemm on the encoder's shapes on `--threads` threads.

usage: slm_flops.py [--assets DIR] [--threads 2] [--steps 6] [SAMPLES_PER_SEC ...]
"""
import argparse, os, time

import torch
from tokenizers import Tokenizer

D, FF, LAYERS, BATCH, MAX_LEN = 384, 1536, 6, 32, 64


def forward_flops(t, b):
    """One padded batch [b, t]: the six linear maps and the two attention products a layer."""
    linear = 2 * b * t * (4 * D * D + 2 * D * FF)
    attention = 2 * 2 * b * t * t * D
    return LAYERS * (linear + attention)


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--assets", default=os.environ.get("CROSSLM_ASSETS", os.path.join(here, "../../assets")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("rates", nargs="*", type=float, help="samples/s to convert")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    mr = os.path.join(a.assets, "data/mr/movieReviewSnippets_GroundTruth.txt")
    rows = open(mr, encoding="utf-8", errors="replace").read().splitlines()
    texts = [r.split("\t")[2].strip() for r in rows if r.count("\t") >= 2][: BATCH * (a.steps + 1)]
    tok = Tokenizer.from_file(os.path.join(a.assets, "minilm/tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    lengths = sorted(len(e.ids) for e in tok.encode_batch(texts))
    timed = [lengths[i:i + BATCH] for i in range(0, len(lengths), BATCH)][1:]
    n = sum(map(len, timed))
    per_sample = sum(forward_flops(max(b), len(b)) for b in timed) / n
    print(f"timed scoring: {n} texts, padded lengths {[max(b) for b in timed]}, "
          f"{per_sample / 1e9:.3f} GFLOP per sample (forward)")
    for rate in a.rates:
        print(f"  {rate:.1f} samples/s = {rate * per_sample / 1e9:.1f} GFLOP/s")

    rows_at = BATCH * 30
    for name, m, k, n_ in [("q/k/v/o", rows_at, D, D), ("ffn up", rows_at, D, FF),
                           ("ffn down", rows_at, FF, D), ("2048 cube", 2048, 2048, 2048)]:
        x, w = torch.randn(m, k), torch.randn(k, n_)
        for _ in range(5):
            x @ w
        reps = max(5, int(3e10 / (2 * m * k * n_)))
        t = time.perf_counter()
        for _ in range(reps):
            x @ w
        dt = (time.perf_counter() - t) / reps
        print(f"torch sgemm {name} {m}x{k}x{n_}, {a.threads} threads: {2 * m * k * n_ / dt / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
