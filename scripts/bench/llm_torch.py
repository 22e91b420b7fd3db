#!/usr/bin/env python3
"""PyTorch reference for coordinator/benches/llm.rs on a GPU: prefill and greedy-generation
tokens/s for the bench's own prompts (batch 1 and 16), on the same GGUF file, through
transformers' GGUF loader (dequantized to the dtype asked for) and a plain KV-cache loop.
Prints one JSON object:
{"b1": {"prefill": x, "generate": y}, "b16": {...}, "dtype": "float32", "device": "...",
 "peak_gpu_mib": z}; "tokens" holds the first sequence's greedy tokens.

usage: llm_torch.py MODEL.gguf --ids PROMPTS.json [--gen 32] [--dtype float32|bfloat16]
       [--device cuda]
PROMPTS.json: {"b1": [[ids...]], "b16": [[ids...], ...]} (the bench writes it).
Needs torch, transformers and gguf.
"""
import argparse, json, os, sys, time

import torch
from transformers import AutoModelForCausalLM


def load(path, dtype, device):
    folder, name = os.path.split(os.path.abspath(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=dtype)
    return model.to(device).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, prompts, n_gen, device):
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    n_seq, n_prompt = ids.shape
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        first = [nxt.tolist()[0]]  # the host needs the next tokens, as in the bench
        prefill = n_seq * n_prompt / (time.perf_counter() - t0)
        past = out.past_key_values
        t1 = time.perf_counter()
        for _ in range(n_gen):
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            first.append(nxt.tolist()[0])
        generate = n_seq * n_gen / (time.perf_counter() - t1)
    return {"prefill": prefill, "generate": generate, "tokens": first}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    prompts = json.load(open(a.ids))
    model = load(a.model, getattr(torch, a.dtype), a.device)
    # Warm-up on the measured shapes (kernel selection, allocator).
    for key in ("b1", "b16"):
        run(model, prompts[key], a.gen, a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = {key: run(model, prompts[key], a.gen, a.device) for key in ("b1", "b16")}
    out["dtype"] = a.dtype
    out["device"] = (torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device)
    out["torch"] = torch.__version__
    if a.device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
