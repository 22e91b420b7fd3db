#!/usr/bin/env python3
"""What each aggregation rule keeps when some clients score adversarially. A diagnostic,
outside the system and CI; pure Python.

Reads one finished run's per-client scores (`crosslm-coordinator samples --data-dir DIR --votes
> run.jsonl`) and an independent judge's probabilities for the same texts (`crosslm-client slm
score --checkpoint JUDGE --data run.jsonl --format jsonl > run.judge.jsonl`, same order). The
rules are re-implemented here from `coordinator/src/round/aggregate.rs` (prior correction, then
weighted mean, median, 25% trimmed mean, screened mean), two-label tasks only; the script first
checks that its replica of the run's own rule reproduces the stored qualities.

Two reports:
- `--explain`: per round, which clients look like attackers (every vote 0 or 1), what the run's
  rule kept, what the honest clients alone would have kept under the median and the mean, and
  each honest client's confidence (mean |q - 0.5|); for the median with attackers, whether it
  equals the mean of the 2nd and 3rd lowest honest votes.
- default: on an honest run, replace k clients' scores by an attack's (invert: all on the other
  label; inflate: all on the intended label; constant: uniform), averaged over every choice of
  the k clients, and print a markdown row per attack: kept samples per round and the share the
  judge calls correct, per rule. The selective attacker is the one screening is not built for:
  it sends its own model's honest scores (so it agrees with the others) except on the samples
  its model rejects (q < 0.5), where it votes all on the intended label, pushing exactly the
  doubtful samples into the kept set. The batches are the honest run's: the LLM's reaction to fewer
  or worse kept samples in later rounds is not simulated (an end-to-end run shows that).

Usage: robust_rules.py [--explain] [--rule weighted_mean|median] SAMPLES.jsonl JUDGE.jsonl
"""

import argparse
import itertools
import json
import math
import statistics


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def correct_prior(rows, labels):
    """`correct_prior`: divide each label's probability by the client's mean of it over the
    batch, times the batch's share of samples written for that label; renormalise."""
    n = len(rows)
    prior = [sum(r[j] for r in rows) / n for j in range(2)]
    target = [sum(1 for lab in labels if lab == j) / len(labels) for j in range(2)]
    out = []
    for r in rows:
        s = [r[j] * target[j] / prior[j] if prior[j] > 1e-9 else 0.0 for j in range(2)]
        t = sum(s)
        out.append([x / t for x in s] if t > 0 else [0.5, 0.5])
    return out


def median(xs):
    return statistics.median(xs)


def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    if saa / n < 1e-12 or sbb / n < 1e-12:
        return 0.0
    return max(-1.0, min(1.0, sab / math.sqrt(saa * sbb)))


def agreement(q):
    """`agreement`: correlation of each client's intended-label probabilities with the median
    of the others'. `q[c][i]`: client c, sample i."""
    if len(q) < 3:
        return [1.0] * len(q)
    n = len(q[0])
    return [
        pearson(q[c], [median([q[o][i] for o in range(len(q)) if o != c]) for i in range(n)])
        for c in range(len(q))
    ]


def rules(q):
    """Quality per sample under each rule (equal weights: the runs' clients hold 64 each).
    With two labels, a rule applied per label and renormalised equals the rule on the
    intended label's probability alone, except the trimmed mean and median, whose two columns
    are mirror images: the same again."""
    n = len(q[0])
    cols = [[q[c][i] for c in range(len(q))] for i in range(n)]
    k = int(len(q) * 0.25)
    agree = agreement(q)
    kept = [c for c in range(len(q)) if agree[c] > 0.0] or list(range(len(q)))
    return {
        "weighted_mean": [sum(col) / len(col) for col in cols],
        "median": [median(col) for col in cols],
        "trimmed_mean": [statistics.fmean(sorted(col)[k : len(col) - k]) for col in cols],
        "screened_mean": [statistics.fmean(col[c] for c in kept) for col in cols],
    }


def load(samples_path, judge_path):
    samples, judged = read_jsonl(samples_path), read_jsonl(judge_path)
    assert len(samples) == len(judged), "judge output is not line for line"
    rounds = {}
    for s, j in zip(samples, judged):
        assert s["text"] == j["text"], "judge output is not line for line"
        rounds.setdefault(s["round"], []).append((s, max(j["probs"], key=j["probs"].get)))
    out = []
    for r in sorted(rounds):
        rows = rounds[r]
        names = sorted({lab for s, _ in rows for lab in [s["label"]]})
        labels = [names.index(s["label"]) for s, _ in rows]
        clients = sorted(rows[0][0]["votes"])
        votes = [[s["votes"][c] for s, _ in rows] for c in clients]
        q = [
            [row[lab] for row, lab in zip(correct_prior(v, labels), labels)]
            for v in votes
        ]
        correct = [s["label"] == j for s, j in rows]
        stored = [s["quality"] for s, _ in rows]
        out.append(dict(round=r, labels=labels, votes=votes, q=q, correct=correct, stored=stored))
    return out


def kept_stats(quality, correct):
    kept = [ok for qq, ok in zip(quality, correct) if qq >= 0.5]
    return len(kept), (sum(kept) / len(kept) if kept else float("nan"))


def explain(rounds, rule):
    for rd in rounds:
        q = rd["q"]
        attackers = [c for c, v in enumerate(rd["votes"]) if all(p in (0.0, 1.0) for r in v for p in r)]
        honest = [c for c in range(len(q)) if c not in attackers]
        mine = rules(q)[rule]
        drift = max(abs(a - b) for a, b in zip(mine, rd["stored"]))
        hq = [q[c] for c in honest]
        h = rules(hq)
        print(
            f"round {rd['round']}: {len(attackers)} attackers; kept by the run's {rule} "
            f"{kept_stats(rd['stored'], rd['correct'])[0]} (replica {kept_stats(mine, rd['correct'])[0]}, "
            f"max |diff| {drift:.1e}); honest only: median {kept_stats(h['median'], rd['correct'])[0]}, "
            f"mean {kept_stats(h['weighted_mean'], rd['correct'])[0]}"
        )
        print(
            "  honest clients' confidence (mean |q - 0.5|): "
            + " ".join(f"{statistics.fmean(abs(x - 0.5) for x in q[c]):.3f}" for c in honest)
        )
        if rule == "median" and len(attackers) == 2 and len(honest) == 6:
            low = [sum(sorted(col)[1:3]) / 2 for col in zip(*hq)]
            gap = max(abs(a - b) for a, b in zip(low, mine))
            print(f"  median of all == mean of 2nd and 3rd lowest honest votes: max |diff| {gap:.1e}")


def simulate(rounds):
    names = ["weighted_mean", "median", "trimmed_mean", "screened_mean"]
    print("| attack | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    n_clients = len(rounds[0]["q"])
    kinds = [(None, 0), ("invert", 1), ("invert", 2), ("inflate", 1), ("inflate", 2), ("constant", 2)]
    for kind, k in kinds + [("selective", 1), ("selective", 2)]:
        acc = {r: [[] for _ in rounds] for r in names}
        screened = [[] for _ in rounds]
        for combo in itertools.combinations(range(n_clients), k):
            for i, rd in enumerate(rounds):
                q = [list(x) for x in rd["q"]]
                for c in combo:
                    if kind == "selective":
                        q[c] = [1.0 if x < 0.5 else x for x in q[c]]
                    else:
                        q[c] = [{"invert": 0.0, "inflate": 1.0, "constant": 0.5}[kind]] * len(q[c])
                out = rules(q)
                if kind == "selective":
                    agree = agreement(q)
                    screened[i].append(sum(agree[c] <= 0.0 for c in combo) / k)
                for r in names:
                    acc[r][i].append(kept_stats(out[r], rd["correct"]))
        cells = []
        for r in names:
            kept = " / ".join(f"{statistics.fmean(a[0] for a in per):.0f}" for per in acc[r])
            ok = " / ".join(f"{100 * statistics.fmean(a[1] for a in per):.0f}" for per in acc[r])
            cells.append(f"{kept} ({ok}%)")
        label = "none" if kind is None else f"{k} x {kind}"
        if kind == "selective":
            label += " (screened out: " + " / ".join(f"{100 * statistics.fmean(s):.0f}%" for s in screened) + ")"
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("samples")
    ap.add_argument("judge")
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--rule", default="weighted_mean", choices=["weighted_mean", "median", "trimmed_mean", "screened_mean"])
    a = ap.parse_args()
    rounds = load(a.samples, a.judge)
    if a.explain:
        explain(rounds, a.rule)
    else:
        simulate(rounds)


if __name__ == "__main__":
    main()
