#!/usr/bin/env python3
"""PyTorch reference for coordinator/benches/tuning.rs: LoRA training steps of the same LLM on
the same batch, on the CPU, in f32.

The bench writes the model's weights (dequantized from its GGUF file, named as there) to a
safetensors file, its shape and the LoRA settings to a JSON file, and the batch's token ids.
This script builds the decoder in plain torch (RMSNorm, RoPE on adjacent pairs or halves,
grouped-query attention over left-padded rows, SwiGLU, tied or separate head), puts LoRA on
the query and value projections of the top blocks (the rest frozen), and times Adam steps on
the weighted NLL of the completions (the LM head only on the positions that predict them).
Prints one JSON object: {"step_ms": [per round], "first_loss": x, "threads": n, "torch": v}.

usage: tuning_torch.py WEIGHTS.safetensors CONFIG.json BATCHES.json [--rounds 3] [--steps 3]
BATCHES.json: {"batches": [{"ids": [[ids...]], "completion": [n, ...]}, ...], "pad": id}: the
warm-up step's batch, then one a step, as the bench ran them.
Needs torch and safetensors.
"""
import argparse, json, math, os, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class Lora(torch.nn.Module):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(d_in, rank) / math.sqrt(d_in))
        self.b = torch.nn.Parameter(torch.zeros(rank, d_out))
        self.scale = alpha / rank

    def forward(self, x):
        return (x @ self.a) @ self.b * self.scale


class Decoder:
    def __init__(self, w, c):
        self.w, self.c = w, c
        hd = c["d_model"] // c["n_heads"]
        i = torch.arange(0, hd // 2, dtype=torch.float64)
        self.inv_freq = (c["rope_theta"] ** (-2.0 * i / hd)).float()
        self.head = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
        top = c["top_layers"] or c["n_layers"]
        self.first = c["n_layers"] - top
        kv = c["n_kv_heads"] * hd
        self.lora = {
            i: (Lora(c["d_model"], c["d_model"], c["rank"], c["alpha"]),
                Lora(c["d_model"], kv, c["rank"], c["alpha"]))
            for i in range(self.first, c["n_layers"])
        }

    def params(self):
        return [p for q, v in self.lora.values() for p in (*q.parameters(), *v.parameters())]

    def norm(self, x, name):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_eps"])
        return x * self.w[name]

    def rope(self, x, cos, sin):
        b, h, t, d = x.shape
        if self.c["rope_halves"]:
            x0, x1 = x[..., : d // 2], x[..., d // 2:]
            return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
        x = x.view(b, h, t, d // 2, 2)
        x0, x1 = x[..., 0], x[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).view(b, h, t, d)

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].t()
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def forward(self, ids, pads):
        c = self.c
        b, t = ids.shape
        h, kvh = c["n_heads"], c["n_kv_heads"]
        hd = c["d_model"] // h
        pos = (torch.arange(t)[None, :] - pads[:, None]).clamp(min=0).float()
        ang = pos[:, None, :, None] * self.inv_freq  # [b, 1, t, hd/2]
        cos, sin = ang.cos(), ang.sin()
        key_ok = torch.arange(t)[None, :] >= pads[:, None]  # [b, t]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        seen = causal[None] & key_ok[:, None, :]  # [b, t(query), t(key)]
        mask = torch.zeros(b, 1, t, t).masked_fill(~seen[:, None], -1e9)
        x = self.w["token_embd.weight"][ids]
        for i in range(c["n_layers"]):
            p = f"blk.{i}."
            with torch.set_grad_enabled(i >= self.first):
                xn = self.norm(x, p + "attn_norm.weight")
                q = self.linear(xn, p + "attn_q")
                k = self.linear(xn, p + "attn_k")
                v = self.linear(xn, p + "attn_v")
                if i in self.lora:
                    q = q + self.lora[i][0](xn)
                    v = v + self.lora[i][1](xn)
                q = self.rope(q.view(b, t, h, hd).transpose(1, 2), cos, sin)
                k = self.rope(k.view(b, t, kvh, hd).transpose(1, 2), cos, sin)
                v = v.view(b, t, kvh, hd).transpose(1, 2)
                k = k.repeat_interleave(h // kvh, dim=1)
                v = v.repeat_interleave(h // kvh, dim=1)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                x = x + self.linear(a.transpose(1, 2).reshape(b, t, -1), p + "attn_output")
                xn = self.norm(x, p + "ffn_norm.weight")
                g = F.silu(self.linear(xn, p + "ffn_gate")) * self.linear(xn, p + "ffn_up")
                x = x + self.linear(g, p + "ffn_down")
        return self.norm(x, "output_norm.weight")


def batch(d, pad):
    seqs, ns = d["ids"], d["completion"]
    longest = max(map(len, seqs))
    pads = [longest - len(s) for s in seqs]
    rows = [[pad] * p + s for p, s in zip(pads, seqs)]
    ids = torch.tensor(rows)
    t = longest - 1
    # Example i's n completion tokens end its row: its last n positions predict them.
    at, targets, weight = [], [], []
    for i, n in enumerate(ns):
        at += [i * t + j for j in range(t - n, t)]
        targets += rows[i][longest - n:]
        weight += [1.0 / (n * len(ns))] * n
    return (ids[:, :-1], torch.tensor(pads), torch.tensor(at), torch.tensor(targets),
            torch.tensor(weight))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("config")
    ap.add_argument("batches")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    threads = int(os.environ.get("CROSSLM_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = json.load(open(a.config))
    model = Decoder(load_file(a.weights), c)
    d = json.load(open(a.batches))
    batches = [batch(b, d["pad"]) for b in d["batches"]]
    opt = torch.optim.Adam(model.params(), lr=c["learning_rate"])

    def step(j):
        ids, pads, at, targets, weight = batches[j]
        hidden = model.forward(ids, pads)
        h = hidden.reshape(-1, hidden.shape[-1])[at]
        logp = F.log_softmax(h @ model.head.t(), -1)
        loss = -(logp.gather(1, targets[:, None])[:, 0] * weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = step(0)  # also the warm-up
    rounds = []
    for r in range(a.rounds):
        t0 = time.perf_counter()
        for s in range(a.steps):
            step(1 + r * a.steps + s)
        rounds.append((time.perf_counter() - t0) / a.steps * 1e3)
    print(json.dumps({"step_ms": rounds, "first_loss": first, "threads": threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
