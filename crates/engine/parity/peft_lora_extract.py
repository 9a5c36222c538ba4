# Hand check (not run by CI: needs torch, transformers, peft):
#   python crates/engine/parity/peft_lora_extract.py target/debug/tensormerge
# writes tiny GPT-2 and Llama models under /tmp/peftcheck, extracts rank-4 adapters
# of exact rank-4 task vectors with `tensormerge lora extract`, loads them with
# peft.PeftModel.from_pretrained, merges, and compares weights and logits with the
# fine-tunes.
import json, subprocess, sys, torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from peft import PeftModel

BIN = sys.argv[1]
torch.manual_seed(0)
R = 4
for name, cfg in [
    ("gpt2", GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)),
    ("llama", LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64)),
]:
    base = AutoModelForCausalLM.from_config(cfg)
    d = f"/tmp/peftcheck/{name}"  # scratch directory
    base.save_pretrained(f"{d}/base")
    ft = AutoModelForCausalLM.from_config(cfg)
    ft.load_state_dict(base.state_dict())
    changed = 0
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if p.dim() == 2 and "wte" not in n and "wpe" not in n and "embed" not in n and "lm_head" not in n:
                a, b = p.shape
                p += 0.05 * torch.randn(a, R) @ torch.randn(R, b)
                changed += 1
    ft.save_pretrained(f"{d}/ft")
    subprocess.run([BIN, "lora", "extract", "--base", f"{d}/base", "--model", f"{d}/ft",
                    "-o", f"{d}/adapter", "--rank", str(R), "--overwrite", "--no-progress"], check=True)
    cfgj = json.load(open(f"{d}/adapter/adapter_config.json"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{d}/base"), f"{d}/adapter")
    merged = model.merge_and_unload()
    sd_m, sd_f = merged.state_dict(), ft.state_dict()
    worst = max((sd_m[k] - sd_f[k]).abs().max().item() / (sd_f[k].abs().max().item() + 1e-12) for k in sd_f)
    x = torch.randint(0, 64, (1, 8)); ft.eval(); merged.eval()
    with torch.no_grad():
        diff = (merged(x).logits - ft(x).logits).abs().max().item()
    print(f"{name}: {changed} weights changed, fan_in_fan_out={cfgj['fan_in_fan_out']}, "
          f"peft merged vs fine-tune: worst relative weight error {worst:.2e}, max logit diff {diff:.2e}")
    assert worst < 1e-5 and diff < 1e-4, name
print("ok")
