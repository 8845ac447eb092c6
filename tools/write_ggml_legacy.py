"""Write a GGUF model as one of the containers before GGUF (ggml, ggmf v1, ggjt v1/v2/v3), the way the
tools of the time wrote them: llama.cpp's convert-pth-to-ggml.py / convert.py and its quantize for LLaMA
(ggml, ggmf, ggjt), ggml's examples (gpt-2, gpt-j, gpt-neox, mpt convert-*-to-ggml.py: unversioned
`ggml`, GGML_QNT_VERSION * 1000 + ftype), bloomz.cpp, and rustformers/llm's ggml-format saver (ggjt v3
with vocabulary scores for every architecture).

    python tools/write_ggml_legacy.py tests/fixtures/llama-q4_0.gguf out.bin --container ggjt --version 2
    python tools/write_ggml_legacy.py tests/fixtures/gpt2-q8_0.gguf out.bin --container ggml --qnt 0
    python tools/write_ggml_legacy.py --fixtures            # remake tests/fixtures/legacy/

Block layouts follow the container (ggml/ggmf/ggjt v1 of LLaMA: layout 1; ggjt v2: 2; ggjt v3: 3) or,
for ggml's examples, the quantization version (`--qnt` 0, 1, 2 -> layout 1, 2, 3), converted here from
GGUF's (layout 3) as ggml.c of each time stored them (src/ggml.c before ggml@fe48e22f: f32 scales and
interleaved nibbles; before ggml@b0d536bb: f32 scales for q4_0, q4_1, q8_0).
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from purelm.formats.gguf import GGUFFile  # noqa: E402
from purelm.quant.types import GGMLType  # noqa: E402

MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}


# ------------------------------------------------------------------------ names, as each converter wrote them

def _layer_names(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """(GGUF name -> legacy name) for the whole-model tensors and, with {i}, the per-layer ones."""
    if arch == "llama":
        top = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
               "output.weight": "output.weight"}
        per = {"attn_q.weight": "layers.{i}.attention.wq.weight", "attn_k.weight": "layers.{i}.attention.wk.weight",
               "attn_v.weight": "layers.{i}.attention.wv.weight",
               "attn_output.weight": "layers.{i}.attention.wo.weight",
               "attn_norm.weight": "layers.{i}.attention_norm.weight", "ffn_norm.weight": "layers.{i}.ffn_norm.weight",
               "ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
               "ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
               "ffn_up.weight": "layers.{i}.feed_forward.w3.weight"}
        return top, per
    if arch == "gpt2":
        top = {"token_embd.weight": "model/wte", "position_embd.weight": "model/wpe", "output.weight": "model/lm_head",
               "output_norm.weight": "model/ln_f/g", "output_norm.bias": "model/ln_f/b"}
        per = {}
        for gg, old in [("attn_norm", "ln_1"), ("ffn_norm", "ln_2")]:
            per.update({f"{gg}.weight": f"model/h{{i}}/{old}/g", f"{gg}.bias": f"model/h{{i}}/{old}/b"})
        for gg, old in [("attn_qkv", "attn/c_attn"), ("attn_output", "attn/c_proj"), ("ffn_up", "mlp/c_fc"),
                        ("ffn_down", "mlp/c_proj")]:
            per.update({f"{gg}.weight": f"model/h{{i}}/{old}/w", f"{gg}.bias": f"model/h{{i}}/{old}/b"})
        return top, per
    wb = lambda pairs: {f"{g}.{s}": f"{o}.{s}" for g, o in pairs for s in ("weight", "bias")}  # noqa: E731
    if arch == "gptj":
        top = {"token_embd.weight": "transformer.wte.weight", **wb([("output_norm", "transformer.ln_f"),
                                                                    ("output", "lm_head")])}
        per = {"attn_q.weight": "transformer.h.{i}.attn.q_proj.weight",
               "attn_k.weight": "transformer.h.{i}.attn.k_proj.weight",
               "attn_v.weight": "transformer.h.{i}.attn.v_proj.weight",
               "attn_output.weight": "transformer.h.{i}.attn.out_proj.weight",
               **wb([("attn_norm", "transformer.h.{i}.ln_1"), ("ffn_up", "transformer.h.{i}.mlp.fc_in"),
                     ("ffn_down", "transformer.h.{i}.mlp.fc_out")])}
        return top, per
    if arch == "gptneox":
        top = {"token_embd.weight": "gpt_neox.embed_in.weight", "output.weight": "embed_out.weight",
               **wb([("output_norm", "gpt_neox.final_layer_norm")])}
        p = "gpt_neox.layers.{i}."
        per = wb([("attn_norm", p + "input_layernorm"), ("ffn_norm", p + "post_attention_layernorm"),
                  ("attn_qkv", p + "attention.query_key_value"), ("attn_output", p + "attention.dense"),
                  ("ffn_up", p + "mlp.dense_h_to_4h"), ("ffn_down", p + "mlp.dense_4h_to_h")])
        return top, per
    if arch == "bloom":
        top = {"token_embd.weight": "tok_embeddings.weight", "output.weight": "output.weight",
               **wb([("token_embd_norm", "norm"), ("output_norm", "output_norm")])}
        per = wb([("attn_norm", "layers.{i}.attention_norm"), ("attn_qkv", "layers.{i}.attention.query_key_value"),
                  ("attn_output", "layers.{i}.attention.wo"), ("ffn_norm", "layers.{i}.ffn_norm"),
                  ("ffn_up", "layers.{i}.feed_forward.w1"), ("ffn_down", "layers.{i}.feed_forward.w2")])
        return top, per
    if arch == "mpt":
        top = {"token_embd.weight": "transformer.wte.weight", "output_norm.weight": "transformer.norm_f.weight"}
        b = "transformer.blocks.{i}."
        per = {"attn_norm.weight": b + "norm_1.weight", "attn_qkv.weight": b + "attn.Wqkv.weight",
               "attn_output.weight": b + "attn.out_proj.weight", "ffn_norm.weight": b + "norm_2.weight",
               "ffn_up.weight": b + "ffn.up_proj.weight", "ffn_down.weight": b + "ffn.down_proj.weight"}
        return top, per
    if arch == "falcon":
        top = {"token_embd.weight": "transformer.word_embeddings.weight", "output.weight": "lm_head.weight",
               **wb([("output_norm", "transformer.ln_f")])}
        h = "transformer.h.{i}."
        per = {"attn_qkv.weight": h + "self_attention.query_key_value.weight",
               "attn_output.weight": h + "self_attention.dense.weight",
               "ffn_up.weight": h + "mlp.dense_h_to_4h.weight", "ffn_down.weight": h + "mlp.dense_4h_to_h.weight",
               **wb([("attn_norm", h + "input_layernorm"), ("attn_norm_2", h + "ln_attn")])}
        return top, per
    raise SystemExit(f"architecture {arch!r} had no legacy format")


def legacy_name(arch: str, name: str, falcon_40b: bool = False) -> str:
    top, per = _layer_names(arch)
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    if arch == "falcon" and falcon_40b and rest.startswith("attn_norm."):  # Falcon-40B: ln_mlp and ln_attn
        return f"transformer.h.{i}.ln_mlp.{rest.split('.')[1]}"
    return per[rest].replace("{i}", i)


# ------------------------------------------------------------------------ hyperparameters and vocabulary

def hyperparameters(arch: str, meta, n_vocab: int) -> bytes:
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    embd, head, layer = g("embedding_length"), g("attention.head_count"), g("block_count")
    ftype = int(meta.get("general.file_type", 0))
    i = lambda *v: struct.pack(f"<{len(v)}i", *v)  # noqa: E731
    if arch == "llama":
        return i(n_vocab, embd, 256, head, layer, g("rope.dimension_count", embd // head), ftype)
    if arch == "gpt2":
        return i(n_vocab, g("context_length"), embd, head, layer, ftype, n_vocab)
    if arch == "gptj":
        return i(n_vocab, g("context_length"), embd, head, layer, g("rope.dimension_count"), ftype, n_vocab)
    if arch == "gptneox":
        return i(n_vocab, g("context_length"), embd, head, layer, g("rope.dimension_count"),
                 int(g("use_parallel_residual", True)), ftype)
    if arch == "bloom":
        return i(n_vocab, embd, 1, head, layer, ftype)
    if arch == "mpt":
        return i(embd, g("context_length"), head, layer, n_vocab) + struct.pack(
            "<ff", g("attention.max_alibi_bias"), g("attention.clamp_kqv", 0.0)) + i(ftype)
    if arch == "falcon":
        return i(n_vocab, embd, head, g("attention.head_count_kv", 1), layer, ftype)
    raise SystemExit(arch)


def _byte_decoder() -> dict[str, int]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def spm_vocabulary(path: str | os.PathLike) -> tuple[list[bytes], list[float]]:
    """A SentencePiece tokenizer.model as llama.cpp's convert-pth-to-ggml.py wrote it: the unknown piece
    as " \u2047 ", control pieces empty, byte pieces as their byte, others with "▁" as a space; scores."""
    from purelm.formats.spm_model import read_sentencepiece

    sp = read_sentencepiece(path)
    out = []
    for piece, kind in zip(sp.pieces, sp.types):
        if kind == 2:
            out.append(" \u2047 ".encode())
        elif kind == 3:
            out.append(b"")
        elif kind == 6:
            out.append(struct.pack("B", int(piece[3:-1], 16)))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out, list(sp.scores)


def vocabulary(arch: str, meta, n_vocab: int) -> list[bytes]:
    """Each token's bytes as that architecture's converter wrote them."""
    dec = _byte_decoder()
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tokens += [tokens[-1]] * (n_vocab - len(tokens))  # ggml's MPT converter repeats the last token
    out = []
    for t, kind in zip(tokens, types + [1] * (n_vocab - len(types))):
        raw = bytes(dec[c] for c in t) if all(c in dec for c in t) else t.encode()
        if arch == "llama":  # convert-pth-to-ggml.py: control pieces empty, "▁" as a space
            raw = b"" if kind == 3 else raw.replace("\u2581".encode(), b" ")
        elif arch == "gptneox":  # tokenizer.decode([i]).encode('utf-8')
            raw = raw.decode("utf-8", "replace").encode()
        elif arch == "mpt":  # chr(byte_decoder[c]) per char, then UTF-8
            raw = "".join(chr(b) for b in raw).encode()
        out.append(raw)
    return out


# ------------------------------------------------------------------------ block layouts of the time

def old_blocks(data: np.ndarray, qtype: GGMLType, layout: int) -> np.ndarray:
    """GGUF's blocks (layout 3) as layout 1 or 2 stored them."""
    if layout == 3 or qtype not in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0):
        return data
    size = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q5_0: 22, GGMLType.Q5_1: 24, GGMLType.Q8_0: 34}[qtype]
    blocks = data.reshape(data.shape[0], -1, size)
    n_f16 = {GGMLType.Q4_0: 1, GGMLType.Q4_1: 2, GGMLType.Q5_0: 1, GGMLType.Q5_1: 2, GGMLType.Q8_0: 1}[qtype]
    scales = np.ascontiguousarray(blocks[..., :2 * n_f16]).view("<f2")
    rest = blocks[..., 2 * n_f16:]
    if qtype in (GGMLType.Q5_0, GGMLType.Q5_1):
        head, rest = blocks[..., :2 * n_f16 + 4], blocks[..., 2 * n_f16 + 4:]  # f16 scales, qh: unchanged
    else:
        head = scales.astype("<f4").view(np.uint8)  # f32 scales until ggjt v3 / GGML_QNT_VERSION 2
    if layout == 1 and qtype != GGMLType.Q8_0:  # byte j: weights j | j+16 -> weights 2j | 2j+1
        q = np.concatenate([rest & 0x0F, rest >> 4], axis=-1)
        rest = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.concatenate([head, rest], axis=-1).reshape(data.shape[0], -1)


def neox_per_head(data: np.ndarray, n_head: int, vector: bool) -> np.ndarray:
    """GGUF's q|k|v blocks back to Hugging Face's per-head order, which ggml's GPT-NeoX keeps."""
    blocks = data.reshape(3, n_head, -1) if vector else data.reshape(3, n_head, -1, data.shape[-1])
    return np.ascontiguousarray(blocks.swapaxes(0, 1)).reshape(data.shape)


# ------------------------------------------------------------------------ the file

def write(src: str | os.PathLike, out: str | os.PathLike, container: str, version: int = 0, qnt: int = 2,
          spm: str | os.PathLike | None = None) -> None:
    """`src` (a GGUF file) as a legacy file; `spm`: a LLaMA vocabulary from this tokenizer.model instead
    of the GGUF file's."""
    f = GGUFFile(src)
    meta, arch = f.metadata, f.architecture
    if container == "ggjt":
        layout = version
    elif arch == "llama":
        layout = 1  # llama.cpp's ggml/ggmf files predate every block-layout change
    else:
        layout = qnt + 1
    n_vocab = f.tensors["token_embd.weight"].shape[0]
    head = struct.pack("<I", MAGIC[container]) + (struct.pack("<I", version) if container != "ggml" else b"")
    hp = bytearray(hyperparameters(arch, meta, n_vocab))
    if container == "ggml" and arch != "llama":  # ggml's examples: the quantization version in the ftype
        at = {"gpt2": 5, "gptj": 6, "gptneox": 7, "bloom": 5, "mpt": 7, "falcon": 5}[arch]
        struct.pack_into("<i", hp, 4 * at, struct.unpack_from("<i", hp, 4 * at)[0] + 1000 * qnt)
    parts = [head, bytes(hp)]
    if spm is not None:
        if arch != "llama":
            raise SystemExit("--spm: a SentencePiece vocabulary is LLaMA's")
        vocab, scores = spm_vocabulary(spm)
        if len(vocab) != n_vocab:
            raise SystemExit(f"--spm: {len(vocab)} pieces for a model of {n_vocab} embedding rows")
    else:  # the GGUF file's tokens; scores: -id for LLaMA (BPE-style ranks), 0 where a vocabulary had none
        vocab = vocabulary(arch, meta, n_vocab)
        scores = [-float(i) if arch == "llama" else 0.0 for i in range(n_vocab)]
    for raw, score in zip(vocab, scores):
        parts.append(struct.pack("<I", len(raw)) + raw)
        if container != "ggml":
            parts.append(struct.pack("<f", score))
    pos = sum(map(len, parts))
    falcon_40b = "blk.0.attn_norm_2.weight" in f.tensors
    n_head = meta.get(f"{arch}.attention.head_count")
    for t in f.tensors.values():
        name = legacy_name(arch, t.name, falcon_40b).encode()
        dims = list(reversed(t.shape))
        hdr = struct.pack(f"<iii{len(dims)}i", len(dims), len(name), int(t.type), *dims) + name
        pos += len(hdr)
        parts.append(hdr)
        if container == "ggjt":
            pad = -pos % 32
            parts.append(b"\0" * pad)
            pos += pad
        data = t.data
        if arch == "gptneox" and ".attn_qkv." in t.name:
            data = neox_per_head(data, n_head, len(t.shape) == 1)
        blob = old_blocks(data, t.type, layout).tobytes()
        parts.append(blob)
        pos += len(blob)
    tmp = str(out) + ".part"
    with open(tmp, "wb") as fh:
        for p in parts:
            fh.write(p)
    os.replace(tmp, out)


# The committed fixtures: every container version (LLaMA), and the other architectures in the containers
# their tools wrote (ggml examples: unversioned ggml; rustformers/llm: ggjt v3).
FIXTURES = [
    ("llama-q4_0", "ggml", 0, 0), ("llama-q4_0", "ggmf", 1, 0), ("llama-q4_0", "ggjt", 1, 0),
    ("llama-q4_0", "ggjt", 2, 0), ("llama-q4_0", "ggjt", 3, 0),
    ("gpt2-q4_0", "ggml", 0, 0), ("mpt-q4_0", "ggml", 0, 1), ("falcon-q4_0", "ggjt", 3, 0),
]


def fixture_name(stem: str, container: str, version: int, qnt: int) -> str:
    tag = container + (f"v{version}" if version else "") + (f"-qnt{qnt}" if container == "ggml" and not
                                                            stem.startswith("llama") else "")
    return f"{stem}.{tag}.bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--container", choices=sorted(MAGIC), default="ggjt")
    ap.add_argument("--version", type=int, default=3, help="ggmf: 1; ggjt: 1, 2 or 3")
    ap.add_argument("--qnt", type=int, default=2, choices=[0, 1, 2],
                    help="GGML_QNT_VERSION of a ggml-example file (not LLaMA): its block layout")
    ap.add_argument("--spm", metavar="TOKENIZER_MODEL", help="LLaMA: the vocabulary of this SentencePiece model")
    ap.add_argument("--fixtures", action="store_true", help="remake tests/fixtures/legacy/")
    a = ap.parse_args()
    if a.fixtures:
        out = ROOT / "tests/fixtures/legacy"
        out.mkdir(exist_ok=True)
        for stem, container, version, qnt in FIXTURES:
            path = out / fixture_name(stem, container, version, qnt)
            write(ROOT / f"tests/fixtures/{stem}.gguf", path, container, version, qnt)
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
        return
    if not (a.gguf and a.out):
        ap.error("give GGUF and OUT, or --fixtures")
    version = 0 if a.container == "ggml" else (1 if a.container == "ggmf" else a.version)
    write(a.gguf, a.out, a.container, version, a.qnt, a.spm)


if __name__ == "__main__":
    main()
