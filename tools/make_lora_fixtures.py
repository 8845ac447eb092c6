"""Regenerate the LoRA adapter fixtures under tests/fixtures/ (needs torch, transformers, peft and the
llama-cpp-python sdist's llama.cpp, whose convert_lora_to_gguf.py writes the adapter files).

    python tools/make_lora_fixtures.py [--llama-cpp DIR]

For each tiny model below (its checkpoint in tests/fixtures/hf/NAME): a seeded random PEFT LoRA on
every linear layer (rank 4, alpha 8, B not zero), saved in tests/fixtures/peft/NAME-lora (PEFT's files)
and converted to `peft/NAME-lora-f32.gguf` by llama.cpp's converter, and `peft/NAME-lora-ref.npz`:
PEFT's float32 logits for the model's fixture ids, and with the adapter at scale 0.5 (its `scaling`
halved), the logits llama.cpp's --lora-scaled 0.5 means.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
NAMES = ("llama", "phi3", "gptneox")  # separate q, k, v; fused qkv and gate|up; fused qkv with its heads interleaved
RANK, ALPHA = 4, 8


def logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def make(name: str, converter: Path) -> None:
    hf = FIX / "hf" / name
    ids = np.load(FIX / f"{name}-ref-f32.npz")["ids"].tolist()
    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    plain = logits(base, ids)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                            init_lora_weights=False)).eval()
    adapted = logits(model, ids)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: v * 0.5 for k, v in module.scaling.items()}
    half = logits(model, ids)
    print(f"{name}: the adapter moves the logits by {np.abs(adapted - plain).max():.3f} "
          f"(largest logit {np.abs(plain).max():.3f})")
    peft_dir = FIX / "peft" / f"{name}-lora"
    shutil.rmtree(peft_dir, ignore_errors=True)
    model.save_pretrained(peft_dir)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"tests/fixtures/hf/{name}"  # (not this machine's path)
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (peft_dir / "README.md").unlink(missing_ok=True)
    out = FIX / "peft" / f"{name}-lora-f32.gguf"
    subprocess.run([sys.executable, str(converter), str(peft_dir), "--base", str(hf), "--outtype", "f32",
                    "--outfile", str(out)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})  # its own gguf-py
    np.savez_compressed(FIX / "peft" / f"{name}-lora-ref.npz", ids=np.array(ids), logits=adapted, half=half, plain=plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36"
                    "/vendor/llama.cpp", help="llama.cpp's source folder (the one with convert_lora_to_gguf.py)")
    a = ap.parse_args()
    for name in NAMES:
        make(name, a.llama_cpp / "convert_lora_to_gguf.py")


if __name__ == "__main__":
    main()
