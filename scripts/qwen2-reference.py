#!/usr/bin/env python3
"""Writes coordinator/src/llm/qwen2-reference.json: what llama.cpp (llama-cpp-python, built for
this CPU) computes on the Qwen2.5 GGUF that scripts/fetch-assets.sh fetches: token ids of
chat prompts and of plain strings, greedy continuations, and the first step's top-5 logits.
The Rust tests in coordinator/src/llm/qwen2_tests.rs hold the Qwen2 decoder to them.

  . scripts/env.sh && ~/.cache/crosslm/bench-venv/bin/python scripts/qwen2-reference.py
  (needs llama-cpp-python and numpy)
"""
import json
import os

import numpy as np
from llama_cpp import Llama

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assets = os.environ.get("CROSSLM_ASSETS", os.path.join(root, "assets"))
path = os.path.join(assets, "qwen2", "Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf")
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
USERS = [
    "Write a one-sentence negative review of a movie.",
    "Write a short positive movie review.",
    "Name three colours.",
]
STRINGS = [
    "Hello world! 123 This movie was great.",
    "It's a 2-hour film; I'd say   it's   fine.\n\nReally?",
    "Café naïve — 東京 🎬 don't",
]
STEPS = 24


def chat(user):
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), logits_all=True,
            verbose=False, seed=0)
out = {"file": os.path.basename(path), "prompts": [], "strings": []}
for s in STRINGS:
    out["strings"].append({"text": s, "ids": llm.tokenize(s.encode(), add_bos=False, special=True)})
for user in USERS:
    ids = llm.tokenize(chat(user).encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    top = np.argsort(-logits)[:5]
    greedy = []
    for _ in range(STEPS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        if nxt == llm.token_eos():
            break
        llm.eval([nxt])
    out["prompts"].append({
        "user": user,
        "ids": ids,
        "greedy": greedy,
        "top5": [[int(i), float(logits[i])] for i in top],
        "text": llm.detokenize(greedy).decode(errors="replace"),
    })
    print(user, "->", out["prompts"][-1]["text"])
dest = os.path.join(root, "coordinator", "src", "llm", "qwen2-reference.json")
with open(dest, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
    f.write("\n")
print("wrote", dest)
