"""Regenerate the encoder (embedding model) fixtures under tests/fixtures/bert/ (needs the `ref` extra).

    python tools/make_bert_fixtures.py

For each family (BERT, DistilBERT, RoBERTa: all `bert` in GGUF): a tiny random transformers model with
a tokenizer trained here (WordPiece, or byte-level BPE for RoBERTa) in `NAME-hf` (BERT's saved as a
sentence-transformers folder: modules.json and 1_Pooling/config.json, mean pooling); the GGUF files
`purelm convert` makes from it (`NAME-TYPE.gguf`); and `NAME-ref.npz`: for each text of TEXTS, the ids
transformers' tokenizer gives and the model's last hidden states in float32, for f32 from the original
model and for each other type from the model running the GGUF file's dequantized weights (read by the
`gguf` package), so every comparison has an exact reference.

`reranker-*` and `xlm-reranker-*`: a RobertaForSequenceClassification (one label: a cross-encoder)
with the RoBERTa tokenizer, and its XLM-RoBERTa twin with the SentencePiece one; its reference holds
the ids transformers gives each (query, document) pair of PAIRS and the
model's scores (logits).

`nomic-*`: nomic-embed-text's architecture: a checkpoint written here in the layout its Hugging Face
repository uses (NomicBertModel's remote code: Wqkv, fc11, fc12), random weights and BERT's tokenizer,
converted by purelm and by llama.cpp's converter. Its reference holds transformers' own NomicBertModel
(which reads that layout) hidden states, as for the other families (q8_0: the dequantized GGUF weights
put back), and llama.cpp's embeddings of TEXTS (llama-cpp-python over the llama.cpp build,
LLAMA_CPP_LIB_PATH): this family needs llama.cpp at hand.

With llama.cpp's source at hand (tests/conftest.py: LLAMA_CPP), also `NAME-llamacpp-f32.gguf`, the same
folder converted by llama.cpp's own convert_hf_to_gguf.py; it knows the pre-tokenizers of published
models only (by a hash of their output), so it is told the one purelm writes.
"""
from __future__ import annotations

import copy
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
from purelm.convert import convert, specs  # noqa: E402
from purelm.formats.gguf import GGUFFile  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "bert"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world",
         "Embeddings: Héllo, WORLD! 12345 unbelievable tokenization", "a"]
CORPUS = TEXTS + ["the cat sat on the mat", "tokens and pieces of words, unbelievable"] * 20
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLAMA_CPP = Path(os.environ.get("PURELM_LLAMA_CPP_DIR",
                                Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp"))
PAIRS = [("what sat on the mat?", "the cat sat on the mat"), ("what sat on the mat?", "hello world"),
         ("quick fox", "The quick brown fox jumps over the lazy dog."), ("a", "a")]


def wordpiece(cls: type) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([t.lower() for t in CORPUS],
                            trainers.WordPieceTrainer(vocab_size=160, special_tokens=WORDPIECE_SPECIALS))
    c, s = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", c), ("[SEP]", s)])
    return cls(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
               mask_token="[MASK]")


def byte_level_bpe() -> transformers.PreTrainedTokenizerFast:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return transformers.RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                             mask_token="<mask>")


def sentencepiece_unigram(hf: Path) -> transformers.PreTrainedTokenizerFast:
    """XLM-RoBERTa's: a SentencePiece unigram model (sentencepiece.bpe.model, fairseq's layout: <unk>,
    <s>, </s> first) with a small normalization table of its own, and the tokenizer.json transformers'
    XLMRobertaConverter makes of it (ids one up behind <s>, <pad>, </s>, <unk>; <mask> last)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex

    work = hf.parent / "spm-work"
    work.mkdir()
    (work / "corpus.txt").write_text("\n".join(CORPUS + ["ｆｕｌｌ ｗｉｄｔｈ ｔｅｘｔ", "café crème naïve résumé"] * 20))
    # full-width letters to ASCII: NFKC's rule for them, a charsmap of about 1 KiB
    (work / "rules.tsv").write_text("".join(f"{ord(c):X}\t{ord(c) - 0xFEE0:X}\n" for c in "ｆｕｌｗｉｄｔｈｅｘ"))
    spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(work / "m"), vocab_size=70,
                                   model_type="unigram", normalization_rule_tsv=str(work / "rules.tsv"),
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    shutil.copy(work / "m.model", hf / "sentencepiece.bpe.model")
    proto = pb.ModelProto()
    proto.ParseFromString((work / "m.model").read_bytes())
    shutil.rmtree(work)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + \
        [(p.piece, p.score) for p in proto.pieces[3:]] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return transformers.XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                                pad_token="<pad>", mask_token="<mask>")


def bert(vocab: int) -> torch.nn.Module:
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12))


def distilbert(vocab: int) -> torch.nn.Module:
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64))


def roberta_config(vocab: int, config: type = transformers.RobertaConfig, **extra) -> transformers.PretrainedConfig:
    return config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=66, type_vocab_size=1,
                                      layer_norm_eps=1e-5, pad_token_id=1, **extra)


def roberta(vocab: int) -> torch.nn.Module:
    return transformers.RobertaModel(roberta_config(vocab))


def xlm_roberta(vocab: int) -> torch.nn.Module:
    return transformers.XLMRobertaModel(roberta_config(vocab, transformers.XLMRobertaConfig))


def reranker(vocab: int) -> torch.nn.Module:
    return transformers.RobertaForSequenceClassification(roberta_config(vocab, num_labels=1))


def xlm_reranker(vocab: int) -> torch.nn.Module:
    return transformers.XLMRobertaForSequenceClassification(
        roberta_config(vocab, transformers.XLMRobertaConfig, num_labels=1))


# name -> (tokenizer, model factory, types, sentence-transformers pooling)
FAMILIES = {
    "bert": (lambda: wordpiece(transformers.BertTokenizerFast), bert, ("f32", "f16", "q8_0", "q4_0"), "mean"),
    "distilbert": (lambda: wordpiece(transformers.DistilBertTokenizerFast), distilbert, ("f32", "q8_0"), None),
    "roberta": (byte_level_bpe, roberta, ("f32", "q8_0"), None),
    "reranker": (byte_level_bpe, reranker, ("f32", "q8_0"), None),
    "xlm-roberta": (sentencepiece_unigram, xlm_roberta, ("f32", "q8_0"), "mean"),
    "xlm-reranker": (sentencepiece_unigram, xlm_reranker, ("f32",), None),
}

LLAMA_CPP_CONVERT = """
import sys
sys.path[:0] = [".", "gguf-py"]
import conversion.base
pre = sys.argv.pop(1)
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf
sys.argv[0] = "convert_hf_to_gguf.py"
convert_hf_to_gguf.main()
"""


def make(name: str) -> None:
    make_tokenizer, factory, types, pooling = FAMILIES[name]
    torch.manual_seed(0)
    hf = OUT / f"{name}-hf"
    hf.mkdir(parents=True)
    tok = make_tokenizer(hf) if make_tokenizer is sentencepiece_unigram else make_tokenizer()
    tok.save_pretrained(hf)
    model = factory(len(tok)).eval()
    with torch.no_grad():  # random weights of BERT's init (std 0.02) give near-constant outputs: widen them,
        for pname, p in model.named_parameters():  # and give the biases (zeros at init) values to check
            if "LayerNorm" in pname or "layer_norm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(8.0)
    model.save_pretrained(hf)
    if pooling:
        (hf / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (hf / "1_Pooling").mkdir()
        (hf / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  f"pooling_mode_{pooling}_tokens": True}))
    rerank = name.endswith("reranker")
    ids = [tok(*p)["input_ids"] for p in PAIRS] if rerank else [tok(t)["input_ids"] for t in TEXTS]
    ref = {f"ids{i}": np.array(seq, np.int64) for i, seq in enumerate(ids)}
    for kind in types:
        path = OUT / f"{name}-{kind}.gguf"
        convert(hf, path, kind)
        runner = model if kind == "f32" else with_gguf_weights(model, path)
        for i, seq in enumerate(ids):
            with torch.no_grad():
                out = runner(input_ids=torch.tensor([seq]))
            if rerank:
                ref[f"{kind}_scores{i}"] = out.logits[0].numpy()
            else:
                ref[f"{kind}_hidden{i}"] = out.last_hidden_state[0].numpy()
    np.savez_compressed(OUT / f"{name}-ref.npz", **ref)
    pre = GGUFFile(OUT / f"{name}-f32.gguf").metadata["tokenizer.ggml.pre"]
    llama_cpp_convert(hf, OUT / f"{name}-llamacpp-f32.gguf", pre)


def llama_cpp_convert(hf: Path, out: Path, pre: str) -> None:
    """`hf` converted to f32 by llama.cpp's convert_hf_to_gguf.py, told the pre-tokenizer `pre`."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    subprocess.run([sys.executable, "-c", LLAMA_CPP_CONVERT, pre, str(hf), "--outtype", "f32", "--outfile", str(out)],
                   cwd=LLAMA_CPP, env=env, check=True)


def with_gguf_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of `model` whose weights are the GGUF file's tensors, dequantized by the `gguf` package
    (RoBERTa's position rows before the padding id's, which the file drops, kept)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    spec = specs()[model.config.architectures[0] if model.config.architectures else type(model).__name__]
    out = copy.deepcopy(model)
    state = out.state_dict()
    names = {}
    for hf, gg in spec.tensors:
        for i in range(model.config.num_hidden_layers):
            if hf.format(i=i) in state:
                names[gg.format(i=i)] = hf.format(i=i)
    for hf in state:  # RoBERTa's, written by the spec's extra_tensors
        if hf.endswith("embeddings.position_embeddings.weight"):
            names.setdefault("position_embd.weight", hf)
    for t in GGUFReader(path).tensors:
        hf = names[t.name]
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32))
        values = values.reshape(-1, *state[hf].shape[1:])
        state[hf][len(state[hf]) - len(values):] = values
    out.load_state_dict(state)
    return out.eval()


LLAMA_CPP_EMBED = """
import json, sys
import numpy as np
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], embedding=True, n_ctx=64, n_threads=1, verbose=False)
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [llm.tokenize(t.encode()) for t in texts],
                  "embeddings": [llm.embed(t, normalize=True) for t in texts]}))
"""


def make_nomic() -> None:
    """A NomicBertModel checkpoint (config and tensors as nomic-embed-text-v1.5's, tiny and random)."""
    from safetensors.numpy import save_file

    hf = OUT / "nomic-hf"
    shutil.copytree(OUT / "bert-hf", hf)
    vocab = len(json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"])
    dim, ff, layers = 64, 128, 2
    cfg = {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "vocab_size": vocab, "n_embd": dim,
           "n_layer": layers, "n_head": 4, "n_inner": ff, "n_positions": 8192, "max_trained_positions": 2048,
           "layer_norm_epsilon": 1e-12, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
           "rotary_emb_interleaved": False, "rotary_emb_scale_base": None, "activation_function": "swiglu",
           "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "prenorm": False,
           "type_vocab_size": 2, "pad_token_id": 0,
           # transformers' own NomicBertConfig reads these names (and llama.cpp's converter through it)
           "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": ff,
           "max_position_embeddings": 2048, "layer_norm_eps": 1e-12, "rope_theta": 1000.0}
    (hf / "config.json").write_text(json.dumps(cfg, indent=1))
    (hf / "model.safetensors").unlink()
    rng = np.random.default_rng(0)

    def w(*shape: int, scale: float = 0.16) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"embeddings.word_embeddings.weight": w(vocab, dim, scale=1.0),
               "embeddings.token_type_embeddings.weight": w(2, dim),
               "emb_ln.weight": 1 + w(dim, scale=0.2), "emb_ln.bias": w(dim, scale=0.2)}
    for i in range(layers):
        b = f"encoder.layers.{i}."
        tensors.update({b + "attn.Wqkv.weight": w(3 * dim, dim), b + "attn.out_proj.weight": w(dim, dim),
                        b + "norm1.weight": 1 + w(dim, scale=0.2), b + "norm1.bias": w(dim, scale=0.2),
                        b + "mlp.fc11.weight": w(ff, dim), b + "mlp.fc12.weight": w(ff, dim),
                        b + "mlp.fc2.weight": w(dim, ff, scale=0.11),
                        b + "norm2.weight": 1 + w(dim, scale=0.2), b + "norm2.bias": w(dim, scale=0.2)})
    save_file(tensors, str(hf / "model.safetensors"))
    for kind in ("f32", "q8_0"):
        convert(hf, OUT / f"nomic-{kind}.gguf", kind)
    llama_cpp_convert(hf, OUT / "nomic-llamacpp-f32.gguf", "default")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["LLAMA_CPP_LIB_PATH"] = str(LLAMA_CPP / "build" / "bin")
    env["PYTHONPATH"] = str(LLAMA_CPP.parent.parent)  # the llama-cpp-python sdist holding this llama.cpp
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP_EMBED, str(OUT / "nomic-llamacpp-f32.gguf"),
                          json.dumps(TEXTS)], env=env, check=True, capture_output=True, text=True).stdout
    ref = json.loads(out)
    arrays = {**{f"ids{i}": np.array(x, np.int64) for i, x in enumerate(ref["ids"])},
              **{f"llamacpp_embedding{i}": np.array(x, np.float32) for i, x in enumerate(ref["embeddings"])}}
    model = transformers.NomicBertModel.from_pretrained(hf, dtype=torch.float32).eval()
    for kind in ("f32", "q8_0"):
        runner = model if kind == "f32" else with_nomic_gguf_weights(model, OUT / f"nomic-{kind}.gguf")
        for i in range(len(TEXTS)):
            with torch.no_grad():
                h = runner(input_ids=torch.tensor([ref["ids"][i]])).last_hidden_state[0]
            arrays[f"{kind}_hidden{i}"] = h.numpy()
    np.savez_compressed(OUT / "nomic-ref.npz", **arrays)


def with_nomic_gguf_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """transformers' NomicBertModel with the GGUF file's tensors (dequantized by `gguf`), q|k|v split."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = copy.deepcopy(model)
    state = out.state_dict()
    names = {"token_embd.weight": ["embeddings.word_embeddings.weight"],
             "token_types.weight": ["embeddings.token_type_embeddings.weight"],
             "token_embd_norm.weight": ["embeddings.LayerNorm.weight"],
             "token_embd_norm.bias": ["embeddings.LayerNorm.bias"]}
    for i in range(model.config.num_hidden_layers):
        b, L = f"blk.{i}.", f"layers.{i}."
        names.update({b + "attn_qkv.weight": [L + f"self_attn.{p}_proj.weight" for p in "qkv"],
                      b + "attn_output.weight": [L + "self_attn.o_proj.weight"],
                      b + "ffn_up.weight": [L + "mlp.up_proj.weight"],
                      b + "ffn_gate.weight": [L + "mlp.gate_proj.weight"],
                      b + "ffn_down.weight": [L + "mlp.down_proj.weight"]})
        for gg, hf in (("attn_output_norm", "post_attention_layernorm"), ("layer_output_norm", "post_mlp_layernorm")):
            names.update({f"{b}{gg}.{k}": [f"{L}{hf}.{k}"] for k in ("weight", "bias")})
    for t in GGUFReader(path).tensors:
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32))
        parts = names[t.name]
        for hf, part in zip(parts, values.reshape(-1, *state[parts[0]].shape[1:]).chunk(len(parts))):
            state[hf][:] = part
    out.load_state_dict(state)
    return out.eval()


def main() -> None:
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").exists() or not (LLAMA_CPP / "build" / "bin").is_dir():
        raise SystemExit(f"llama.cpp's source and build are not at {LLAMA_CPP} (PURELM_LLAMA_CPP_DIR; "
                         "../shared/peers/build-llama-cpp.sh builds them): the fixtures include its conversions")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name in FAMILIES:
        make(name)
    make_nomic()
    print("wrote", *sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
