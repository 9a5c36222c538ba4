#!/usr/bin/env python3
"""Checks `tensormerge generate` and `tensormerge perplexity` against Hugging
Face `transformers` itself, on tiny random models that `transformers` writes.

For each architecture (llama, mistral, qwen2, gpt2) this script builds a small
random model with `transformers` (save_pretrained: config.json and
model.safetensors) and a word-level `tokenizer.json` with the `tokenizers`
library, then compares:

- greedy generation: the token ids of `model.generate(do_sample=False)` with
  those of `tensormerge generate --greedy --json` (must be equal);
- perplexity: the mean negative log-likelihood over the documented windows
  (non-overlapping windows of `--context` tokens, the first token of each
  window not scored), computed here from `transformers`' logits, with
  `tensormerge perplexity --json` (must agree to 1e-4).

It needs torch and transformers, which CI does not install (a CPU torch is
several GB); run it by hand:

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch transformers
    cargo build -p tensormerge-cli
    /tmp/tvenv/bin/python crates/nn/parity/transformers_parity.py --bin target/debug/tensormerge

It prints one line per check and exits 1 when any check fails.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = (
    "the court ruled on a claim and judge held that contract bake bread in oven "
    "with salt flour water cook recipe law tenant rights . , of to is was for"
).split()
PROMPTS = ["the court ruled", "bake the bread in", "the contract"]
TEXT = " ".join(
    ["the court ruled on the claim and the judge held that the contract was law ."]
    + ["bake the bread in the oven with salt , flour and water ."] * 2
) * 3


def write_tokenizer(path: Path) -> None:
    vocab = {"[UNK]": 0, "</s>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return len(vocab)


def make(arch: str, root: Path) -> Path:
    d = root / arch
    d.mkdir()
    vocab = write_tokenizer(d)
    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3, "gpt2": 4}[arch])
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            eos_token_id=1, bos_token_id=1,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        common = dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, eos_token_id=1, bos_token_id=1,
            rms_norm_eps=1e-6,
        )
        if arch == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        elif arch == "mistral":
            model = transformers.MistralForCausalLM(
                transformers.MistralConfig(**common, sliding_window=None)
            )
        else:
            model = transformers.Qwen2ForCausalLM(
                transformers.Qwen2Config(**common, tie_word_embeddings=True)
            )
    # Random init has small weights; scale them up so the logits differ
    # clearly between tokens (greedy ties would make the check weak).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    return d


def ids_of(d: Path, text: str):
    return Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids


def run(bin_: str, *args: str):
    out = subprocess.run([bin_, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr}")
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the tensormerge binary")
    a = ap.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "text.txt").write_text(TEXT)
        for arch in ["llama", "mistral", "qwen2", "gpt2"]:
            d = make(arch, root)
            model = transformers.AutoModelForCausalLM.from_pretrained(d)
            model.eval()
            # Greedy generation.
            args = ["generate", str(d), "--greedy", "--json", "--max-new-tokens", "12"]
            for p in PROMPTS:
                args += ["--prompt", p]
            ours = run(a.bin, *args)
            for p, g in zip(PROMPTS, ours):
                ids = torch.tensor([ids_of(d, p)])
                with torch.no_grad():
                    ref = model.generate(
                        ids, do_sample=False, max_new_tokens=12,
                        attention_mask=torch.ones_like(ids), pad_token_id=1,
                    )[0, ids.shape[1]:].tolist()
                ok = ref == g["tokens"]
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {arch} generate {p!r}: transformers {ref} tensormerge {g['tokens']}")
            # Perplexity over non-overlapping windows of 8 tokens.
            ctx = 8
            ids = ids_of(d, TEXT)
            nll, n = 0.0, 0
            for start in range(0, len(ids) - ctx + 1, ctx):
                w = torch.tensor([ids[start:start + ctx]])
                with torch.no_grad():
                    lp = torch.log_softmax(model(w).logits[0].double(), -1)
                for t in range(1, ctx):
                    nll -= lp[t - 1, ids[start + t]].item()
                    n += 1
            ref = nll / n
            ours = run(a.bin, "perplexity", str(d), "--text", str(root / "text.txt"),
                       "--context", str(ctx), "--json")[0]
            ok = abs(ours["nll"] - ref) < 1e-4 and ours["scored_tokens"] == n
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {arch} perplexity: transformers nll {ref:.6f} "
                  f"(ppl {math.exp(ref):.4f}, {n} tokens) tensormerge nll {ours['nll']:.6f} "
                  f"({ours['scored_tokens']} tokens)")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: "
          f"{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
