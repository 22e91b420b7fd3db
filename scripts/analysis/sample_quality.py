#!/usr/bin/env python3
"""How good were a run's synthetic samples? A diagnostic, outside the system and CI.

Reads the samples and aggregated client scores of finished runs
(`crosslm-coordinator samples --data-dir DIR > run.jsonl`) and an independent judge's
probabilities for the same texts (`crosslm-client slm score --checkpoint JUDGE --data run.jsonl
--format jsonl > run.judge.jsonl`; the judge is an SLM trained on far more labeled data than any
client holds). Prints, per run and round, a markdown row:

- judged correct: share of samples whose judge label is the intended label (label noise = 1 - it);
- kept / kept correct / dropped correct: the samples at or above the quality threshold, and how
  often the judge agrees with the intended label among the kept and the dropped ones;
- AUC: how well the clients' aggregated quality ranks judged-correct samples above the others
  (0.5 = no better than chance);
- distinct-2: distinct word bigrams over all bigrams in the round's batch (diversity);
- words: mean sample length.

Usage: sample_quality.py [--threshold 0.5] NAME=SAMPLES.jsonl:JUDGE.jsonl ...
"""

import argparse
import json
import sys
from collections import defaultdict


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rival_share(sample):
    """What the threshold applies to (`AggregatedScore::rival_share`): the intended label's
    share against its strongest rival; the quality itself with two labels."""
    q, soft = sample["quality"], sample.get("soft") or []
    if len(soft) <= 2:
        return q
    others = list(soft)
    others.remove(min(others, key=lambda p: abs(p - q)))
    total = q + max(others)
    return q / total if total > 0 else 0.0


def judge_label(row, labels):
    """The judge's most probable label name, from one `slm score` line."""
    probs = row.get("probs") or row.get("probabilities")
    if isinstance(probs, dict):
        return max(probs, key=probs.get)
    if isinstance(probs, list):
        return labels[max(range(len(probs)), key=probs.__getitem__)]
    raise ValueError(f"unrecognised judge line: {row}")


def auc(pos, neg):
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def distinct2(texts):
    bigrams = []
    for t in texts:
        w = t.lower().split()
        bigrams.extend(zip(w, w[1:]))
    return len(set(bigrams)) / max(len(bigrams), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("runs", nargs="+", help="NAME=SAMPLES.jsonl:JUDGE.jsonl")
    args = ap.parse_args()
    print("| run | round | samples | judged correct | kept | kept correct | dropped correct "
          "| AUC | distinct-2 | words |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        name, files = spec.split("=", 1)
        samples_path, judge_path = files.split(":", 1)
        samples = read_jsonl(samples_path)
        judged = read_jsonl(judge_path)
        if len(samples) != len(judged):
            sys.exit(f"{name}: {len(samples)} samples but {len(judged)} judge lines")
        labels = sorted({s["label"] for s in samples})
        by_round = defaultdict(list)
        for s, j in zip(samples, judged):
            if "text" in j and j["text"] != s["text"]:
                sys.exit(f"{name}: judge lines are not in the samples' order")
            by_round[s["round"]].append((s, judge_label(j, labels) == s["label"]))
        for r in sorted(by_round):
            rows = by_round[r]
            scored = [(rival_share(s), ok) for s, ok in rows if s["quality"] is not None]
            kept = [ok for q, ok in scored if q >= args.threshold]
            dropped = [ok for q, ok in scored if q < args.threshold]
            share = lambda xs: f"{100 * sum(xs) / len(xs):.0f}%" if xs else "-"
            a = auc([q for q, ok in scored if ok], [q for q, ok in scored if not ok])
            texts = [s["text"] for s, _ in rows]
            words = sum(len(t.split()) for t in texts) / len(texts)
            print(f"| {name} | {r} | {len(rows)} | {share([ok for _, ok in rows])} "
                  f"| {len(kept)} | {share(kept)} | {share(dropped)} | {a:.2f} "
                  f"| {distinct2(texts):.2f} | {words:.1f} |")


if __name__ == "__main__":
    main()
