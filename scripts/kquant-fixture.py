#!/usr/bin/env python3
"""Writes sdk/src/quant/kquant-fixture.json: random blocks of the k-quant files' formats
(Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and their values as the `gguf` Python package (llama.cpp's
gguf-py) dequantizes them; the Rust test `llm::kquant::tests::matches_the_gguf_package`
holds our dequantization to them.

  python scripts/kquant-fixture.py   (needs numpy and gguf: pip install gguf)
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(20261203)


def f16_bytes(lo, hi):
    return np.array([rng.uniform(lo, hi)], dtype=np.float16).tobytes()


def block(t):
    """One block of type t: random bits, with its f16 scales set to finite, sane values."""
    if t == T.Q5_0:
        return f16_bytes(0.001, 0.05) + rng.bytes(20)
    if t == T.Q5_1:
        return f16_bytes(0.001, 0.05) + f16_bytes(-0.5, 0.5) + rng.bytes(20)
    if t == T.Q4_K:
        return f16_bytes(0.0005, 0.01) + f16_bytes(0.0005, 0.01) + rng.bytes(140)
    if t == T.Q5_K:
        return f16_bytes(0.0005, 0.01) + f16_bytes(0.0005, 0.01) + rng.bytes(172)
    if t == T.Q6_K:
        return rng.bytes(208) + f16_bytes(0.0005, 0.01)
    raise ValueError(t)


cases = []
for t in [T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]:
    data = b"".join(block(t) for _ in range(3))
    values = dequantize(np.frombuffer(data, dtype=np.uint8), t).astype(np.float32).ravel()
    cases.append({
        "type": int(t),
        "name": t.name,
        "bytes": data.hex(),
        "values": [float(v) for v in values],
    })

out = os.path.join(os.path.dirname(__file__), "..", "sdk", "src", "quant", "kquant-fixture.json")
with open(out, "w") as f:
    json.dump(cases, f, separators=(",", ":"))
print(f"{out}: {sum(len(c['values']) for c in cases)} values of {len(cases)} types")
