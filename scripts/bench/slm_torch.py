#!/usr/bin/env python3
"""PyTorch CPU baseline for `cargo bench --bench slm`: MiniLM (all-MiniLM-L6-v2) fine-tuning and
scoring throughput on the same texts, batch size and sequence cap as the burn bench.

Plain torch (no `transformers`): a hand-written BERT that loads model.safetensors, so the only
extra dependency is `torch`. Prints one JSON object on the last line:
{"train_samples_per_sec": ..., "score_samples_per_sec": ..., "threads": ..., "torch": "...",
"simd": "AVX512"}

usage: slm_torch.py MODEL_DIR TEXTS_JSON --batch 32 --max-len 64 --train-steps 6 --score-batches 8 --score-passes 5
"""
import argparse, json, math, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer


class Bert(nn.Module):
    def __init__(self, cfg, n_labels):
        super().__init__()
        d, self.h = cfg["hidden_size"], cfg["num_attention_heads"]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], d)
        self.typ = nn.Embedding(cfg["type_vocab_size"], d)
        self.ln = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.layers = nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            l = nn.Module()
            l.q, l.k, l.v, l.o = (nn.Linear(d, d) for _ in range(4))
            l.ln1 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
            l.i = nn.Linear(d, cfg["intermediate_size"])
            l.out = nn.Linear(cfg["intermediate_size"], d)
            l.ln2 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
            self.layers.append(l)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, n_labels)

    def load_hf(self, w):
        g = lambda n: w.get(n, w.get("bert." + n))
        self.word.weight.data = g("embeddings.word_embeddings.weight")
        self.pos.weight.data = g("embeddings.position_embeddings.weight")
        self.typ.weight.data = g("embeddings.token_type_embeddings.weight")
        self.ln.weight.data, self.ln.bias.data = g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias")
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                 "i": "intermediate.dense", "out": "output.dense", "ln2": "output.LayerNorm"}
        for n, l in enumerate(self.layers):
            for attr, hf in names.items():
                m = getattr(l, attr)
                m.weight.data = g(f"encoder.layer.{n}.{hf}.weight")
                m.bias.data = g(f"encoder.layer.{n}.{hf}.bias")

    def forward(self, ids, mask):
        b, t = ids.shape
        x = self.word(ids) + self.pos(torch.arange(t)[None]) + self.typ.weight[0]
        x = self.drop(self.ln(x))
        bias = (1.0 - mask)[:, None, None, :] * -1e9
        for l in self.layers:
            split = lambda y: y.view(b, t, self.h, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(split(l.q(x)), split(l.k(x)), split(l.v(x)), attn_mask=bias)
            x = l.ln1(x + self.drop(l.o(a.transpose(1, 2).reshape(b, t, -1))))
            x = l.ln2(x + self.drop(l.out(F.gelu(l.i(x)))))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(self.drop(pooled))


def batches(tok, texts, batch):
    # Same bucketing as the burn side: sort by length, then cut into batches.
    enc = sorted((e.ids for e in tok.encode_batch(texts)), key=len)
    for i in range(0, len(enc), batch):
        chunk = enc[i:i + batch]
        t = max(map(len, chunk))
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros(len(chunk), t)
        for j, e in enumerate(chunk):
            ids[j, :len(e)] = torch.tensor(e)
            mask[j, :len(e)] = 1
        yield ids, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("texts_json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--score-batches", type=int, default=8)
    ap.add_argument("--score-passes", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    texts = json.load(open(a.texts_json))
    tok = Tokenizer.from_file(a.model_dir + "/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(a.max_len)
    cfg = json.load(open(a.model_dir + "/config.json"))
    model = Bert(cfg, 2)
    model.load_hf(load_file(a.model_dir + "/model.safetensors"))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

    train_batches = list(batches(tok, texts[: a.batch * (a.train_steps + 1)], a.batch))
    model.train()
    n, secs = 0, 0.0
    for step, (ids, mask) in enumerate(train_batches):
        labels = torch.randint(0, 2, (ids.shape[0],))
        start = time.perf_counter()
        loss = F.cross_entropy(model(ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > 0:  # the first step warms up allocators and kernels
            n += ids.shape[0]
            secs += time.perf_counter() - start

    model.eval()
    score_texts = texts[: a.batch * (a.score_batches + 1)]
    sn, ssecs = 0, 0.0
    score_batches = list(batches(tok, score_texts, a.batch))
    with torch.inference_mode():
        for p in range(a.score_passes):
            for step, (ids, mask) in enumerate(score_batches):
                start = time.perf_counter()
                F.softmax(model(ids, mask), -1)
                if step > 0:  # the first batch warms up, as the first training step
                    sn += ids.shape[0]
                    ssecs += time.perf_counter() - start
    print(json.dumps({
        "train_samples_per_sec": n / secs if secs else math.nan,
        "score_samples_per_sec": sn / ssecs if ssecs else math.nan,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # The widest vectors torch's own kernels run with here (its BLAS picks on its own).
        "simd": torch.backends.cpu.get_cpu_capability(),
    }))


if __name__ == "__main__":
    main()
