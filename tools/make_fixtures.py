"""Regenerate the model fixtures under tests/fixtures/ (needs the `ref` extra: torch, transformers).

    pip install -e '.[ref]' && python tools/make_fixtures.py [--smollm2 PATH]

For each tiny random architecture: a Hugging Face checkpoint (safetensors + tokenizer.json), the GGUF
files `purelm convert` makes from it (f32, f16, q8_0, q4_0), and transformers' float32 logits for a fixed
id sequence plus 8 greedy steps with its KV cache. For f32 the reference is the original HF model; for
the quantized files it is transformers loading that GGUF (it dequantizes to float32), so every
comparison has an exact reference. With the SmolLM2 file: transformers' logits for a few prompts.

With --kquant: the K-quant fixtures, `NAME-w256-q4_k_m.gguf` and `NAME-w256-ref-q4_k_m.npz`, for the
tools/tiny modules' KQUANT models (the same families at widths of 256, since K-quants need rows of
256-weight super-blocks): converted to f32 in a temporary folder, quantized by `purelm quantize ...
Q4_K_M` (llama-quantize's mix), and the reference is the HF model running the dequantized GGUF weights.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from purelm.convert import convert  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = "The quick brown fox jumps over the lazy dog. 12345 \t code()\n"
N_GREEDY = 8
TYPES = ("f32", "f16", "q8_0", "q4_0")
KQUANT_MIX = "Q4_K_M"
# The tiny models' weights are widened 8x at widths of 32-64; at 256 that would make every product
# sqrt(8) times larger (logits ~3x those of the tiny models, and float rounding with them), so the
# K-quant models are widened to the same logit range as the tiny ones instead.
KQUANT_WIDEN = 8.0 / 8 ** 0.5



# name -> untransform(gguf_name, array): tiny models whose quantized references are made by
# reference_from_gguf_weights (a tools/tiny module's optional FROM_GGUF_WEIGHTS), filled by tiny_models
FROM_GGUF_WEIGHTS: dict = {}
# name -> (factory(vocab), untransform): the K-quant fixtures' models (a tools/tiny module's optional KQUANT)
KQUANT: dict = {}


def tiny_models() -> dict:
    """Every tools/tiny/*.py module's TINY: name -> factory(vocab) returning a transformers model."""
    import importlib.util

    found = {}
    for path in sorted((ROOT / "tools" / "tiny").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"tiny_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found.update(mod.TINY)
        FROM_GGUF_WEIGHTS.update(getattr(mod, "FROM_GGUF_WEIGHTS", {}))
        KQUANT.update(getattr(mod, "KQUANT", {}))
    return found


def reference_from_gguf_weights(hf: Path, gguf_path: Path, untransform) -> torch.nn.Module:
    """The HF model with every weight replaced by the dequantized GGUF tensor (read and dequantized by
    the `gguf` package), `untransform(gguf_name, array)` undoing the converter's edits: for
    architectures whose GGUF transformers cannot load with the full config."""
    import json

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from purelm.convert import specs

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    cfg = json.loads((hf / "config.json").read_text())
    spec = specs()[cfg["architectures"][0]]
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    params = dict(model.named_parameters())
    done = set()
    for hf_pat, gguf_pat in spec.tensors:
        for i in range(cfg[spec.n_layer_key]) if "{i}" in hf_pat else [None]:
            hf_name, name = hf_pat.format(i=i), gguf_pat.format(i=i)
            if name in tensors and hf_name in params:
                t, p = tensors[name], params[hf_name]
                x = untransform(name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(p.shape))
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.ascontiguousarray(x)))
                done.add(hf_name)
    extra = getattr(untransform, "extra", None)  # {gguf name: array} -> {hf name: array}, for split tensors
    if extra:
        arrays = {n: dequantize(t.data, t.tensor_type).astype(np.float32) for n, t in tensors.items()}
        for hf_name, x in extra(arrays).items():
            with torch.no_grad():
                params[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(x)).reshape(params[hf_name].shape))
            done.add(hf_name)
    if set(params) - done:
        raise RuntimeError(f"{gguf_path.name}: no GGUF tensor for {sorted(set(params) - done)}")
    return model


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [PROMPT, "hello world, the cat sat on the mat", "def f(x):\n    return x + 1\n"] * 50
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_reference(path: Path, model: torch.nn.Module, ids: list[int]) -> None:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float().numpy()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_GREEDY, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = np.stack([s[0].float().numpy() for s in out.logits])
    np.savez_compressed(path, ids=np.array(ids), logits=logits, greedy=out.sequences[0, len(ids):].numpy(),
                        greedy_logits=steps)


def write_checkpoint(factory, hf: Path, widen: float = 8.0) -> tuple[torch.nn.Module, list[int]]:
    """A seeded random model from `factory` saved as a HF checkpoint in `hf`; returns it and the prompt ids."""
    torch.manual_seed(0)
    model = factory(VOCAB).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits are far from zero and ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(widen)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    shutil.rmtree(hf, ignore_errors=True)
    model.save_pretrained(hf, safe_serialization=True)
    tok = tiny_tokenizer()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", '
                                              '"add_bos_token": false}')
    return model, tok.encode(PROMPT).ids


def make_tiny(name: str, factory) -> None:
    hf = FIX / "hf" / name
    model, ids = write_checkpoint(factory, hf)
    save_reference(FIX / f"{name}-ref-f32.npz", model, ids)
    for t in TYPES:
        gguf = FIX / f"{name}-{t}.gguf"
        convert(hf, gguf, t)
        if t != "f32" and name in FROM_GGUF_WEIGHTS:
            loaded = reference_from_gguf_weights(hf, gguf, FROM_GGUF_WEIGHTS[name])
            save_reference(FIX / f"{name}-ref-{t}.npz", loaded, ids)
        elif t != "f32":
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                FIX, gguf_file=gguf.name, dtype=torch.float32).eval()
            save_reference(FIX / f"{name}-ref-{t}.npz", loaded, ids)
    print(f"{name}: {len(ids)} prompt ids, files in {FIX}")


def make_kquant(name: str, factory, untransform) -> None:
    """`NAME-q4_k_m.gguf` (purelm convert to f32, then purelm quantize Q4_K_M) and its reference: the HF
    model with the dequantized GGUF weights swapped in. The checkpoint and the f32 file are not kept."""
    from purelm.quantize import quantize_file

    qtype = KQUANT_MIX.lower()
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / name
        _, ids = write_checkpoint(factory, hf, KQUANT_WIDEN)
        convert(hf, Path(tmp) / "f32.gguf", "f32")
        gguf = FIX / f"{name}-{qtype}.gguf"
        summary = quantize_file(Path(tmp) / "f32.gguf", gguf, KQUANT_MIX, progress=False)
        legacy = [f"{t.name} ({t.dst_type.name})" for t in summary.tensors
                  if t.dst_type != t.src_type and t.dst_type.name[-2:] != "_K"]
        if summary.n_fallback or legacy:  # a width that does not split into 256-weight blocks
            raise RuntimeError(f"{name}: not every quantized tensor is a K-quant: {legacy}")
        loaded = reference_from_gguf_weights(hf, gguf, untransform)
        save_reference(FIX / f"{name}-ref-{qtype}.npz", loaded, ids)
    types = ", ".join(f"{k} x{v[0]}" for k, v in summary.by_type.items())
    print(f"{name}: {gguf.name} {gguf.stat().st_size} bytes ({types}), {len(ids)} prompt ids")


def make_smollm2(path: Path) -> None:
    prompts = ["The capital of France is",
               "def fibonacci(n):\n\tif n < 2:\n\t\treturn n",
               "<|im_start|>user\nWhat is 2+2? 🤔<|im_end|>\n<|im_start|>assistant\n"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).symlink_to(path.resolve())
        tok = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    cols = np.sort(rng.choice(model.config.vocab_size, 1024, replace=False))
    out = {"cols": cols}
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        out[f"ids{i}"] = np.array(ids)
        out[f"last{i}"] = logits[-1]
        out[f"cols{i}"] = logits[:, cols]
    x = torch.tensor([out["ids0"].tolist()])
    with torch.no_grad():
        g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    out["greedy0"] = g[0, x.shape[1]:].numpy()
    np.savez_compressed(FIX / "smollm2-ref.npz", **out)
    print("smollm2:", tok.decode(out["greedy0"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, default=None, help="the SmolLM2-135M-Instruct Q4_1 GGUF")
    ap.add_argument("--only", nargs="*", default=None, help="tiny architectures to make (default: all)")
    ap.add_argument("--kquant", action="store_true", help=f"make the {KQUANT_MIX} fixtures at widths of 256 "
                    "instead (--only then names those, e.g. qwen3-w256)")
    a = ap.parse_args()
    FIX.mkdir(parents=True, exist_ok=True)
    tiny = tiny_models()
    if a.kquant:
        for name in a.only or KQUANT:
            make_kquant(name, *KQUANT[name])
        return
    for name in a.only or tiny:
        make_tiny(name, tiny[name])
    if a.smollm2:
        make_smollm2(a.smollm2)


if __name__ == "__main__":
    main()
