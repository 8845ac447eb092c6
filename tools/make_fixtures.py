"""Regenerate the model fixtures under tests/fixtures/ (needs the `ref` extra: torch, transformers).

    pip install -e '.[ref]' && python tools/make_fixtures.py [--smollm2 PATH]

For each tiny random architecture: a Hugging Face checkpoint (safetensors + tokenizer.json), the GGUF
files `purelm convert` makes from it (f32, f16, q8_0, q4_0), and transformers' float32 logits for a fixed
id sequence plus 8 greedy steps with its KV cache. For f32 the reference is the original HF model; for
the quantized files it is transformers loading that GGUF (it dequantizes to float32), so every
comparison has an exact reference. With the SmolLM2 file: transformers' logits for a few prompts.
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



# name -> untransform(gguf_name, array): tiny models whose quantized references are made by
# reference_from_gguf_weights (a tools/tiny module's optional FROM_GGUF_WEIGHTS), filled by tiny_models
FROM_GGUF_WEIGHTS: dict = {}


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


def make_tiny(name: str, factory) -> None:
    torch.manual_seed(0)
    model = factory(VOCAB).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits are far from zero and ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    hf = FIX / "hf" / name
    shutil.rmtree(hf, ignore_errors=True)
    model.save_pretrained(hf, safe_serialization=True)
    tok = tiny_tokenizer()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", '
                                              '"add_bos_token": false}')
    ids = tok.encode(PROMPT).ids
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
    a = ap.parse_args()
    FIX.mkdir(parents=True, exist_ok=True)
    tiny = tiny_models()
    for name in a.only or tiny:
        make_tiny(name, tiny[name])
    if a.smollm2:
        make_smollm2(a.smollm2)


if __name__ == "__main__":
    main()
