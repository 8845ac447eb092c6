"""Write the tokenizer test fixtures (needs transformers, torch and sentencepiece; the tests do not).

Outputs, under tests/fixtures/:
  tok_llama_spm.gguf      a tiny GGUF with a SentencePiece ("llama") vocabulary trained here
  tokenizer_spm.json      transformers' ids and decodes for CORPUS with that file, and the ids
                          for the same vocabulary under the phi3 and gemma3 architectures
  tokenizer_smollm2.json  the same for the real SmolLM2-135M-Instruct file (a "gpt2" vocabulary)

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=name)`, the tokenizer transformers
builds from a GGUF file's metadata. Run from the repository root:

    python tools/make_tokenizer_fixtures.py [--smollm2 PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DEFAULT_SMOLLM2 = Path("~/.cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()

# Strings that tend to break tokenizers: whitespace runs, digits, scripts, emoji, special-token text.
CORPUS = [
    "",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  two leading spaces",
    "two trailing spaces  ",
    "multiple     spaces   inside",
    "line one\nline two\n\nline four\r\nwindows\r\n",
    "Hello, world! It's a test. I'm sure they'll've done it.",
    "Hello , world . It 's spaced ; ok ?",
    "I'M SHOUTING, YOU'RE NOT",
    "1234567",
    "3.14159 and 1,000,000 and 2024-01-01 and 0x1F",
    "x=10**12; y = 007",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",  # Japanese
    "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\u3002",  # Chinese
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",  # Korean
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",  # Russian
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",  # Greek
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",  # Arabic
    "\u0939\u093f\u0928\u094d\u0926\u0940",  # Hindi
    "\U0001f600",
    "\U0001f44d\U0001f3fd",  # thumbs up, skin tone
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",  # family ZWJ sequence
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # rainbow flag
    "I \u2764\ufe0f you \U0001f600\U0001f603!",
    "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5",  # flags
    "e\u0301",  # combining acute
    "Cafe\u0301 vs Caf\u00e9",
    "Z\u0324\u0354\u0367\u0311\u0353a\u0308\u0356\u032d\u0308\u0307lgo",
    "def f(x):\n\treturn x  +  1\n\n\n",
    'if (a && b) {\n    printf("%d\\n", a);\n}',
    "    indented\n\tline\r\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more",
    "<|im_start|",
    "< |im_start|>",
    "<s>hi</s>",
    "<think>why</think> because",
    "\u00a0nbsp",
    "zero\u200bwidth",
    "\ufeffBOM",
    "tab\tseparated\tvalues",
    "Mixed CASE and camelCase and snake_case and kebab-case",
    "https://example.com/path?q=1&r=2#frag",
    "\ufb01 ligature and \u2126 ohm",
    "\u3000ideographic space",
    "a\u2028b",
    "\x00\x01control\x7f",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

# Text to train the tiny SentencePiece model on: mostly English, so CJK and emoji fall back to bytes.
SPM_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello world, hello there.
A tokenizer splits text into pieces; the model sees only the ids of those pieces.
It's a test of the tokenizer, and we're testing that it works the same as the reference.
Numbers like 1234567 and 3.14159 are split into single digits by many tokenizers.
def main():
    print("hello world")
    return 0
Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe.
Spaces   and	tabs and
newlines all matter to a tokenizer that keeps whitespace.
"""


def _train_spm(workdir: Path) -> "object":
    """A SentencePiece BPE model with byte fallback, trained like llama's (no normalization)."""
    import sentencepiece as spm

    text = workdir / "train.txt"
    text.write_text(SPM_TRAINING_TEXT * 20, encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_writer=model,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=["<think>", "</think>"],
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _spm_token_types(sp) -> list[int]:
    """Token types as llama.cpp's converter writes them (NORMAL=1 ... BYTE=6)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    types = []
    for index, piece in enumerate(proto.pieces):
        kind = 1
        if sp.is_unknown(index):
            kind = 2
        elif sp.is_control(index):
            kind = 3
        elif sp.is_unused(index):
            kind = 5
        elif sp.is_byte(index):
            kind = 6
        elif piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED:
            kind = 4
        types.append(kind)
    return types


def write_spm_gguf(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sp = _train_spm(Path(tmp))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [float(sp.get_score(i)) for i in range(sp.get_piece_size())]
    write_vocab_gguf(path, "llama", tokens, scores, _spm_token_types(sp), (sp.bos_id(), sp.eos_id(), sp.unk_id()))


def write_vocab_gguf(path: Path, architecture: str, tokens, scores, types, special_ids) -> None:
    """A GGUF with no tensors: a SentencePiece vocabulary and enough hyperparameters for transformers."""
    import gguf

    bos, eos, unk = special_ids
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_key_length(4)
    writer.add_value_length(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def architecture_variants(spm_path: Path) -> dict:
    """The same vocabulary under architectures whose tokenizer transformers builds differently."""
    import gguf
    from transformers import AutoTokenizer

    meta = {field.name: field.contents() for field in gguf.GGUFReader(str(spm_path)).fields.values()}
    ids = tuple(meta[f"tokenizer.ggml.{key}_token_id"] for key in ("bos", "eos", "unknown"))
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in ("phi3", "gemma3"):
            path = Path(tmp) / f"{architecture}.gguf"
            write_vocab_gguf(
                path, architecture, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                meta["tokenizer.ggml.token_type"], ids,
            )
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            variants[architecture] = [
                {"ids": tok.encode(text), "decode": tok.decode(tok.encode(text))} for text in CORPUS
            ]
    return variants


def reference(gguf_path: Path, label: str) -> dict:
    """transformers' ids and decodes for CORPUS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases = []
    for text in CORPUS:
        ids = tok.encode(text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": tok.encode(text, add_special_tokens=False),
                "decode": tok.decode(ids),
                "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    import tokenizers
    import transformers

    return {
        "file": label,
        "made_with": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
        "vocab_size": len(tok),
        "cases": cases,
    }


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(data['cases'])} cases)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, default=Path(os.environ.get("PURELM_SMOLLM2", DEFAULT_SMOLLM2)))
    args = parser.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)

    spm_path = FIXTURES / "tok_llama_spm.gguf"
    write_spm_gguf(spm_path)
    print(f"wrote {spm_path} ({spm_path.stat().st_size} bytes)")
    spm_reference = reference(spm_path, spm_path.name)
    spm_reference["architectures"] = architecture_variants(spm_path)
    _dump(FIXTURES / "tokenizer_spm.json", spm_reference)

    if args.smollm2.is_file():
        _dump(FIXTURES / "tokenizer_smollm2.json", reference(args.smollm2, args.smollm2.name))
    else:
        print(f"skipped SmolLM2: {args.smollm2} not found")


if __name__ == "__main__":
    main()
