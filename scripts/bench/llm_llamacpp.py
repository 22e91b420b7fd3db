#!/usr/bin/env python3
"""llama.cpp reference for coordinator/benches/llm.rs: prefill and greedy-generation tokens/s
for batch 1 and 16 on a GGUF file, through llama-cpp-python's low-level API (one context,
16 sequences decoded together in one llama_batch per step). Prints one JSON object:
{"b1": {"prefill": x, "generate": y}, "b16": {...}, "peak_rss_mib": z, "threads": n,
"simd": "AVX2 AVX512 ..."} (the instruction sets this llama.cpp build uses, from its own
system info).

usage: llm_llamacpp.py MODEL.gguf [--prompt 128] [--gen 32] [--threads 2]
"""
import argparse, ctypes, json, os, resource, sys, time

import llama_cpp as L
import numpy as np


def fn(*names):
    for n in names:
        if hasattr(L, n):
            return getattr(L, n)
    raise AttributeError("llama_cpp has none of " + ", ".join(names))


def peak_rss_mib():
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def simd_used():
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | OPENMP = 1 |": the features this build was compiled with.
    info = L.llama_print_system_info().decode(errors="replace")
    keep = ("AVX", "F16C", "FMA", "AMX", "NEON", "SVE")
    on = [k.strip() for k, _, v in (f.partition("=") for f in info.split("|"))
          if v.strip() == "1" and k.strip().startswith(keep)]
    return " ".join(on)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = fn("llama_model_load_from_file", "llama_load_model_from_file")(a.model.encode(), mp)
    if not model:
        sys.exit("failed to load " + a.model)
    n_vocab = (L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
               if hasattr(L, "llama_model_get_vocab") else L.llama_n_vocab(model))

    def make_ctx(n_seq):
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * (a.prompt + a.gen + 8)
        cp.n_batch = max(512, n_seq * a.prompt)
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.n_threads = a.threads
        cp.n_threads_batch = a.threads
        return fn("llama_init_from_model", "llama_new_context_with_model")(model, cp)

    text = ("The film opens on a quiet street where an old projectionist keeps a cinema alive "
            "against the odds. Critics praised the performances, the score and the "
            "photography, though some found the pacing slow in the second half. ")
    buf = (L.llama_token * 8192)()
    vocab = L.llama_model_get_vocab(model) if hasattr(L, "llama_model_get_vocab") else model
    raw = (text * (1 + a.prompt // 30)).encode()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, 8192, False, True)
    base = [buf[i] for i in range(n)]

    def run(n_seq):
        ctx = make_ctx(n_seq)
        batch = L.llama_batch_init(max(n_seq * a.prompt, n_seq), 0, n_seq)
        prompts = [[base[(s * 3 + i) % len(base)] for i in range(a.prompt)] for s in range(n_seq)]

        def fill(items):  # items: (token, pos, seq, want_logits)
            batch.n_tokens = len(items)
            for i, (t, p, s, lg) in enumerate(items):
                batch.token[i] = t
                batch.pos[i] = p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                batch.logits[i] = 1 if lg else 0

        t0 = time.perf_counter()
        fill([(t, i, s, i == a.prompt - 1) for s, pr in enumerate(prompts) for i, t in enumerate(pr)])
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed (prefill)")
        rows = [s * a.prompt + a.prompt - 1 for s in range(n_seq)]
        nxt = [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), shape=(n_vocab,))))
               for r in rows]
        prefill = n_seq * a.prompt / (time.perf_counter() - t0)
        t1 = time.perf_counter()
        for step in range(a.gen):
            fill([(nxt[s], a.prompt + step, s, True) for s in range(n_seq)])
            if L.llama_decode(ctx, batch) != 0:
                sys.exit("llama_decode failed (generate)")
            nxt = [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, s), shape=(n_vocab,))))
                   for s in range(n_seq)]
        generate = n_seq * a.gen / (time.perf_counter() - t1)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return {"prefill": prefill, "generate": generate}

    run(1)  # warm-up
    out = {"b1": run(1), "b16": run(16),
           "peak_rss_mib": peak_rss_mib(),
           "threads": a.threads,
           "simd": simd_used()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
