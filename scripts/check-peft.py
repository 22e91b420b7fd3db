#!/usr/bin/env python3
"""Checks an exported PEFT adapter numerically against burn's adapted model.

Loads the GGUF base into Hugging Face transformers (its GGUF loader dequantizes the weights
and undoes the converter's q/k row permutation), applies the adapter that
`crosslm-coordinator llm export-peft` wrote with `peft`, and compares next-token logits with
`crosslm-coordinator llm logits` (burn's f32 decoder with the same .lora file) on a few
prompts. Prints the max abs difference with and without the adapter, and how far the adapter
moves the logits; fails if the adapted models disagree more than the base models do (with a
floor for float noise) or if the adapter moves nothing.

  python scripts/check-peft.py --adapters DATA/llm/adapters-3.lora [--model GGUF]

Needs torch, transformers, peft and gguf (e.g. in the bench venv: pip install transformers
peft gguf) and a built workspace (`cargo build --release --workspace`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PROMPTS = [
    "<|im_start|>user\nWrite a one-sentence movie review that is positive.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a one-sentence movie review that is negative.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the city begins in",
    "<|im_start|>user\nIs this review positive or negative? a dull, lifeless film.<|im_end|>\n<|im_start|>assistant\n",
]


def coordinator():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/crosslm/target")
    return os.path.join(target, "release", "crosslm-coordinator")


def burn_logits(model, adapters, prompt):
    cmd = [coordinator(), "llm", "logits", "--model", model]
    if adapters:
        cmd += ["--adapters", adapters]
    out = subprocess.run(cmd + [prompt], check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["ids"], r["logits"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--adapters", required=True, help="a coordinator's .lora file")
    ap.add_argument("--floor", type=float, default=1e-3, help="float-noise floor for the bound")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        peft_dir = os.path.join(tmp, "peft")
        subprocess.run(
            [coordinator(), "llm", "export-peft", "--model", args.model,
             "--adapters", args.adapters, "--out", peft_dir],
            check=True, capture_output=True,
        )
        gguf_dir, gguf_file = os.path.split(os.path.abspath(args.model))
        base = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        base.eval()

        def hf_logits(model, ids):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0, -1].double()

        base_diff, rows = 0.0, []
        for p in PROMPTS:
            ids, b = burn_logits(args.model, None, p)
            d = (hf_logits(base, ids) - torch.tensor(b, dtype=torch.float64)).abs().max().item()
            base_diff = max(base_diff, d)
            rows.append((ids, torch.tensor(b, dtype=torch.float64)))

        tuned = PeftModel.from_pretrained(base, peft_dir)
        tuned.eval()
        tuned_diff, moved = 0.0, 0.0
        for p, (ids, b) in zip(PROMPTS, rows):
            ids2, t = burn_logits(args.model, args.adapters, p)
            assert ids2 == ids
            t = torch.tensor(t, dtype=torch.float64)
            moved = max(moved, (t - b).abs().max().item())
            tuned_diff = max(tuned_diff, (hf_logits(tuned, ids) - t).abs().max().item())

    bound = max(2.0 * base_diff, args.floor)
    print(json.dumps({
        "prompts": len(PROMPTS),
        "max_abs_diff_base": base_diff,
        "max_abs_diff_adapted": tuned_diff,
        "adapter_moves_logits_by": moved,
        "bound": bound,
    }, indent=1))
    if moved <= 10 * bound:
        sys.exit(f"the adapter moves the logits by {moved:.3g} only: nothing to check")
    if tuned_diff > bound:
        sys.exit(f"adapted logits differ by {tuned_diff:.3g} > {bound:.3g}")
    print("PEFT export agrees with burn")


if __name__ == "__main__":
    main()
