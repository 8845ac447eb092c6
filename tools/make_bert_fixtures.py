"""Regenerate the BERT (embedding model) fixtures under tests/fixtures/bert/ (needs the `ref` extra).

    python tools/make_bert_fixtures.py

A tiny random transformers `BertModel` with a WordPiece tokenizer trained here, saved as a
sentence-transformers folder (modules.json and 1_Pooling/config.json, mean pooling) in `bert/hf`;
the GGUF files `purelm convert` makes from it (f32, f16, q8_0, q4_0); and `bert-ref.npz`: for each
text of TEXTS, the ids transformers' tokenizer gives and the last hidden states of the model in
float32, for f32 from the original model and for each other type from the model running the GGUF
file's dequantized weights (read by the `gguf` package), so every comparison has an exact reference.
With llama.cpp's source at hand (tests/conftest.py: LLAMA_CPP), also `bert-llamacpp-f32.gguf`, the
same folder converted by llama.cpp's own convert_hf_to_gguf.py; it knows the pre-tokenizers of
published models only (by a hash of their output), so it is told "default", the one purelm writes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from purelm.convert import convert  # noqa: E402
from purelm.models.bert import TENSORS  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "bert"
TYPES = ("f32", "f16", "q8_0", "q4_0")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world",
         "Embeddings: Héllo, WORLD! 12345 unbelievable tokenization", "a"]


def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = [t.lower() for t in TEXTS] + ["the cat sat on the mat", "tokens and pieces of words, unbelievable"] * 20
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=160, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def main() -> None:
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    hf = OUT / "hf"
    hf.mkdir(parents=True)
    fast = transformers.BertTokenizerFast(tokenizer_object=tokenizer(), unk_token="[UNK]", sep_token="[SEP]",
                                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    fast.save_pretrained(hf)
    cfg = transformers.BertConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
                                  layer_norm_eps=1e-12)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # random weights of BERT's init (std 0.02) give near-constant outputs: widen them
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(8.0)
    model.save_pretrained(hf)
    (hf / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (hf / "1_Pooling").mkdir()
    (hf / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode_mean_tokens": True}))
    ids = [fast(t)["input_ids"] for t in TEXTS]
    ref: dict[str, np.ndarray] = {}
    for i, seq in enumerate(ids):
        ref[f"ids{i}"] = np.array(seq, np.int64)
    for kind in TYPES:
        path = OUT / f"bert-{kind}.gguf"
        convert(hf, path, kind)
        runner = model if kind == "f32" else with_gguf_weights(model, path)
        for i, seq in enumerate(ids):
            with torch.no_grad():
                h = runner(input_ids=torch.tensor([seq])).last_hidden_state[0]
            ref[f"{kind}_hidden{i}"] = h.numpy().astype(np.float32)
    np.savez_compressed(OUT / "bert-ref.npz", **ref)
    llama_cpp = Path(os.environ.get("PURELM_LLAMA_CPP_DIR", Path.home() / ".cache/purelm-peers/"
                                    "llama_cpp_python-0.3.36/vendor/llama.cpp"))
    if (llama_cpp / "convert_hf_to_gguf.py").exists():
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        subprocess.run([sys.executable, "-c", LLAMA_CPP_CONVERT, str(hf), "--outtype", "f32", "--outfile",
                        str(OUT / "bert-llamacpp-f32.gguf")], cwd=llama_cpp, env=env, check=True)
    print("wrote", *sorted(p.name for p in OUT.iterdir()))


LLAMA_CPP_CONVERT = """
import sys
sys.path[:0] = [".", "gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import convert_hf_to_gguf
sys.argv[0] = "convert_hf_to_gguf.py"
convert_hf_to_gguf.main()
"""


def with_gguf_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of `model` whose weights are the GGUF file's tensors, dequantized by the `gguf` package."""
    import copy

    from gguf import GGUFReader
    from gguf.quants import dequantize

    names = {gg: hf for hf, gg in TENSORS if not hf.startswith("bert.")}
    out = copy.deepcopy(model)
    state = out.state_dict()
    for t in GGUFReader(path).tensors:
        for i in range(model.config.num_hidden_layers):
            hf = names.get(t.name.replace(f"blk.{i}.", "blk.{i}."), None)
            if hf is not None:
                hf = hf.format(i=i)
                break
        values = dequantize(t.data, t.tensor_type).reshape(state[hf].shape)
        state[hf] = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    out.load_state_dict(state)
    return out.eval()


if __name__ == "__main__":
    main()
