"""BERT, the embedding-model encoder: bidirectional attention on every backend against a float64
reference; the tiny fixture (tools/make_bert_fixtures.py) against transformers' hidden states for
f32, f16, q8_0 and q4_0 on each backend; its tokenizer against transformers'; pooling (the file's, and
mean, cls and last on request); `purelm convert` of a sentence-transformers folder as llama.cpp's
converter writes it; the refusals (generation, hostile metadata, over-long inputs); the CLI and the
server's /v1/embeddings. llama.cpp running these files: benchmarks/interop.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import purelm
from purelm.backends.base import AttentionSpec
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.embeddings import hidden_states
from purelm.errors import ContextOverflowError, FormatError, ShapeError, UsageError
from purelm.formats.gguf import GGUFFile
from conftest import FIXTURES, INT16_LOGITS_REL, rewrite_gguf

BERT = FIXTURES / "bert"
REF = np.load(BERT / "bert-ref.npz")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world",
         "Embeddings: Héllo, WORLD! 12345 unbelievable tokenization", "a"]  # as tools/make_bert_fixtures.py
FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "nomic")  # "bert" in GGUF ("nomic-bert")
FILES = [(f, t) for f in FAMILIES for t in ("f32", "f16", "q8_0", "q4_0") if (BERT / f"{f}-{t}.gguf").exists()]
PAIRS = [("what sat on the mat?", "the cat sat on the mat"), ("what sat on the mat?", "hello world"),
         ("quick fox", "The quick brown fox jumps over the lazy dog."), ("a", "a")]  # the reranker's


def backends() -> dict:
    out = {"numpy": NumpyBackend(), "numba-1": NumbaBackend(1), "numba-2": NumbaBackend(2)}
    try:
        from purelm.backends.torch_backend import TorchBackend

        out["torch"] = TorchBackend("cpu", "fp32", threads=1)
    except ImportError:
        pass
    return out


BACKENDS = backends()


# -- the op: attention without a causal mask

def reference_attention(q, keys, values, scale):
    """Every query over every key given, float64."""
    n_head, n_kv = q.shape[1], keys.shape[1]
    kk = np.repeat(keys.astype(np.float64), n_head // n_kv, axis=1)
    vv = np.repeat(values.astype(np.float64), n_head // n_kv, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kk) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vv).reshape(len(q), -1)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_non_causal_attention_sees_the_whole_run(name, n_head, n_kv):
    be, dim = BACKENDS[name], 32
    spec = AttentionSpec(scale=dim ** -0.5, causal=False)
    rng = np.random.default_rng(3)
    cache = be.kv_cache(1, 256, n_kv, dim, dim)
    seqs = [cache.add(), cache.add()]
    keys = {s: [] for s in seqs}
    values = {s: [] for s in seqs}
    # a short run and a long one in one pass (the kernels' decode and prompt paths), then runs that
    # continue both sequences (they also see the keys of the first pass)
    for lengths in ((5, 70), (3, 1)):
        runs = list(zip(seqs, lengths))
        T = sum(lengths)
        q = rng.standard_normal((T, n_head, dim)).astype(np.float32) * 2
        k = rng.standard_normal((T, n_kv, dim)).astype(np.float32) * 2
        v = rng.standard_normal((T, n_kv, dim)).astype(np.float32)
        view = cache.view(runs)
        if name == "torch":
            import torch

            got = be.to_numpy(be.attention(*map(torch.from_numpy, (q, k, v)), view, 0, spec))
        else:
            got = be.attention(q, k, v, view, 0, spec)
        view.commit()
        t0 = 0
        for s, n in runs:
            keys[s].append(k[t0:t0 + n])
            values[s].append(v[t0:t0 + n])
            want = reference_attention(q[t0:t0 + n], np.concatenate(keys[s]), np.concatenate(values[s]), spec.scale)
            np.testing.assert_allclose(got[t0:t0 + n], want, rtol=0, atol=2e-5 * np.abs(want).max())
            t0 += n


def test_a_non_causal_spec_takes_no_window_or_alibi():
    be = BACKENDS["numpy"]
    cache = be.kv_cache(1, 16, 2, 8, 8)
    x = np.zeros((3, 2, 8), np.float32)
    for bad in (dict(window=2), dict(alibi_slopes=np.ones(2, np.float32)), dict(softcap=30.0)):
        with pytest.raises(ShapeError, match="non-causal"):
            be.attention(x, x, x, cache, 0, AttentionSpec(scale=1.0, causal=False, **bad))


# -- the model against transformers

@pytest.mark.parametrize("family,kind", FILES)
@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "numba-1"])
def test_hidden_states_match_transformers(name, family, kind):
    ref = np.load(BERT / f"{family}-ref.npz")
    llm = purelm.load(BERT / f"{family}-{kind}.gguf", backend=BACKENDS[name])
    for i in range(len(TEXTS)):
        want = ref[f"{kind}_hidden{i}"]
        cache = llm.model.new_cache(64)
        got = hidden_states(llm.model, cache, cache.add(), ref[f"ids{i}"])
        assert got.shape == want.shape
        # int16 activations (the numba backend's products of quantized weights) move values as they move
        # a decoder's logits (conftest.INT16_LOGITS_REL)
        bound = INT16_LOGITS_REL if name.startswith("numba") and kind not in ("f32", "f16") else 1e-4
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < bound, f"{name} {family} {kind} text {i}: {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_match_transformers(family):
    # WordPiece (BERT, DistilBERT), byte-level BPE with <s> ... </s> (RoBERTa) and SentencePiece unigram with its
    # own normalization table (XLM-RoBERTa)
    ref = np.load(BERT / f"{family}-ref.npz")
    llm = purelm.load(BERT / f"{family}-f32.gguf", backend="numpy")
    for i, text in enumerate(TEXTS):
        assert llm.tokenize(text) == ref[f"ids{i}"].tolist()


def test_embeddings_pool_as_asked():
    llm = purelm.load(BERT / "bert-f32.gguf", backend="numpy")
    assert GGUFFile(BERT / "bert-f32.gguf").metadata["bert.pooling_type"] == 1  # modules.json: mean
    got = {p: llm.embed(TEXTS, pooling=p) for p in (None, "mean", "cls", "last")}
    for i in range(len(TEXTS)):
        h = REF[f"f32_hidden{i}"].astype(np.float64)
        for pooling, row in (("mean", h.mean(0)), ("cls", h[0]), ("last", h[-1])):
            want = row / np.linalg.norm(row)
            np.testing.assert_allclose(got[pooling][i], want, atol=2e-6, err_msg=pooling)
    np.testing.assert_array_equal(got[None], got["mean"])
    np.testing.assert_array_equal(llm.embed(TEXTS[0]), got["mean"][0])
    with pytest.raises(UsageError, match="pooling"):
        llm.embed("x", pooling="max")


def with_metadata(tmp_path, **changes):
    """The f32 fixture with metadata changed."""
    return rewrite_gguf(BERT / "bert-f32.gguf", tmp_path / "bert.gguf", meta=changes)


def test_the_files_pooling_type_is_followed(tmp_path):
    llm = purelm.load(with_metadata(tmp_path, **{"bert.pooling_type": 2}), backend="numpy")
    h = REF["f32_hidden1"][0].astype(np.float64)
    np.testing.assert_allclose(llm.embed(TEXTS[1]), h / np.linalg.norm(h), atol=2e-6)


@pytest.mark.parametrize("changes, match", [
    ({"bert.pooling_type": 4}, "rank"),
    ({"bert.pooling_type": 7}, "pooling_type"),
    ({"bert.pooling_type": "mean"}, "pooling_type"),
    ({"bert.attention.causal": True}, "causal"),
    ({"bert.context_length": 1000}, "position_embd"),
])
def test_hostile_metadata_is_named(tmp_path, changes, match):
    with pytest.raises(FormatError, match=match):
        purelm.load(with_metadata(tmp_path, **changes), backend="numpy").embed("hello")


def test_refusals():
    llm = purelm.load(BERT / "bert-q8_0.gguf", backend="numpy", n_ctx=256)
    for call in (lambda: llm.generate("hello", max_tokens=2), lambda: llm.logits([2, 3]),
                 lambda: llm.chat([{"role": "user", "content": "hi"}])):
        with pytest.raises(UsageError, match="embedding model"):
            call()
    # 64 learned positions: a longer input is refused, and the model keeps working
    with pytest.raises(ContextOverflowError, match="64 learned positions"):
        llm.embed("word " * 80)
    np.testing.assert_allclose(llm.embed(TEXTS[0]), purelm.load(BERT / "bert-q8_0.gguf", backend="numpy").embed(TEXTS[0]))


# -- conversion

@pytest.mark.parametrize("family", FAMILIES + ("reranker", "xlm-reranker"))
def test_convert_writes_what_llama_cpps_converter_writes(tmp_path, family):
    # NAME-llamacpp-f32.gguf: the fixture's folder converted by llama.cpp's convert_hf_to_gguf.py
    from purelm.convert import convert

    out = tmp_path / f"{family}-f32.gguf"
    convert(BERT / f"{family}-hf", out, "f32")
    f, ref = GGUFFile(out), GGUFFile(BERT / f"{family}-llamacpp-f32.gguf")
    ours = {k for k in f.metadata if k != "general.name"}
    assert ours == {k for k in ref.metadata if k not in ("general.name", "general.type", "general.size_label")}
    for k in ours:
        assert f.metadata.types[k] == ref.metadata.types[k], k
        assert np.array_equal(np.asarray(f.metadata[k]), np.asarray(ref.metadata[k])), k
    assert set(f.tensors) == set(ref.tensors)
    for name, t in f.tensors.items():
        assert (t.type, t.shape) == (ref.tensors[name].type, ref.tensors[name].shape), name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ref.tensors[name].data), err_msg=name)
    if family != "bert":
        return
    m = f.metadata
    assert m["bert.attention.causal"] is False and m["tokenizer.ggml.model"] == "bert"
    assert m["tokenizer.ggml.token_type_count"] == 2  # llama.cpp refuses a BERT file without it
    tokens = list(m["tokenizer.ggml.tokens"])
    # llama.cpp's "phantom space" vocabulary: "##" pieces lose it, word starts gain "▁", [CLS] stays
    hf_vocab = json.loads((BERT / "bert-hf" / "tokenizer.json").read_text())["model"]["vocab"]
    for piece, i in hf_vocab.items():
        want = piece if piece.startswith("[") else piece[2:] if piece.startswith("##") else "\u2581" + piece
        assert tokens[i] == want
    assert m["tokenizer.ggml.bos_token_id"] == hf_vocab["[CLS]"]
    assert m["tokenizer.ggml.seperator_token_id"] == m["tokenizer.ggml.eos_token_id"] == hf_vocab["[SEP]"]
    # as llama.cpp's converter: position and token-type embeddings stay F32 in a quantized file
    q = GGUFFile(BERT / "bert-q4_0.gguf")
    assert q.tensors["position_embd.weight"].type.name == q.tensors["token_types.weight"].type.name == "F32"
    assert q.tensors["token_embd.weight"].type.name == "Q4_0"


def test_convert_pooling_modes_and_refusals(tmp_path):
    from purelm.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(BERT / "bert-hf", hf)
    pooling = hf / "1_Pooling" / "config.json"
    for cfg, want in (({"pooling_mode_cls_token": True}, 2), ({"pooling_mode": "lasttoken"}, 3)):
        pooling.write_text(json.dumps(cfg))
        convert(hf, tmp_path / "out.gguf", "f16")
        assert GGUFFile(tmp_path / "out.gguf").metadata["bert.pooling_type"] == want
    pooling.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(FormatError, match="pooling_mode"):
        convert(hf, tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()
    (hf / "modules.json").unlink()
    convert(hf, tmp_path / "plain.gguf", "f16")
    assert "bert.pooling_type" not in GGUFFile(tmp_path / "plain.gguf").metadata
    cfg = json.loads((hf / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(purelm.PurelmError, match="hidden_act"):
        convert(hf, tmp_path / "relu.gguf", "f16")


def test_xlm_roberta_without_tokenizer_json_keeps_bos_and_eos(tmp_path):
    from purelm.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(BERT / "xlm-roberta-hf", hf)
    (hf / "tokenizer.json").unlink()
    llm = purelm.load(convert(hf, tmp_path / "x.gguf", "f32"), backend="numpy")
    assert llm.tokenize(TEXTS[1]) == np.load(BERT / "xlm-roberta-ref.npz")["ids1"].tolist()


def test_classifier_labels_in_id_order(tmp_path):
    from purelm.models.bert import classifier_kv

    labels = {str(i): f"L{i}" for i in range(12)}
    assert classifier_kv(tmp_path, {"id2label": labels})["bert.classifier.output_labels"] == \
        [f"L{i}" for i in range(12)]
    assert "bert.classifier.output_labels" not in classifier_kv(tmp_path, {"id2label": {"0": "LABEL_0",
                                                                                        "1": "LABEL_1"}})


@pytest.mark.parametrize("pad", [-1, 65, True, "1", 10**12])  # (66 position rows)
def test_roberta_padding_id_is_checked(tmp_path, pad):
    from purelm.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(BERT / "roberta-hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["pad_token_id"] = pad
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(purelm.PurelmError, match="pad_token_id"):
        convert(hf, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()


# -- a reranker (RobertaForSequenceClassification, one label)

@pytest.mark.parametrize("family,kind", [("reranker", "f32"), ("reranker", "q8_0"), ("xlm-reranker", "f32")])
@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "numba-1"])
def test_reranker_scores_match_transformers(name, family, kind):
    ref = np.load(BERT / f"{family}-ref.npz")
    llm = purelm.load(BERT / f"{family}-{kind}.gguf", backend=BACKENDS[name])
    for i, (query, doc) in enumerate(PAIRS):  # "<s> q </s></s> d </s>", as transformers pairs them
        assert llm.tokenizer.encode_pair(query, doc) == ref[f"ids{i}"].tolist()
    want = np.array([float(ref[f"{kind}_scores{i}"][0]) for i in range(len(PAIRS))])
    got = np.zeros(len(PAIRS))
    for query in {q for q, _ in PAIRS}:
        rows = [i for i, (q, _) in enumerate(PAIRS) if q == query]
        got[rows] = llm.rerank(query, [PAIRS[i][1] for i in rows])
    # as the hidden states' bound, over the largest score
    bound = INT16_LOGITS_REL if name.startswith("numba") and kind != "f32" else 1e-4
    np.testing.assert_allclose(got, want, rtol=0, atol=bound * np.abs(want).max())


def test_pairs_join_as_llama_cpp_joins_them():
    # BERT's file (add_eos, no add_sep): [CLS] q [SEP] d [SEP]; a file from before those keys: llama.cpp's
    # WordPiece defaults (add_sep, no EOS): [CLS] q [SEP] d
    tok = purelm.load(BERT / "bert-f32.gguf", backend="numpy").tokenizer
    q, d = tok.encode("what sat", add_special=False), tok.encode("the cat", add_special=False)
    cls, sep = tok.bos_id, tok.sep_id
    assert tok.encode_pair("what sat", "the cat") == [cls, *q, sep, *d, sep]
    from purelm.tokenizer import Tokenizer

    meta = dict(GGUFFile(BERT / "bert-f32.gguf").metadata)
    for key in ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token", "tokenizer.ggml.eos_token_id"):
        meta.pop(key)
    assert Tokenizer.from_gguf_metadata(meta).encode_pair("what sat", "the cat") == [cls, *q, sep, *d]


def test_pair_texts_stay_text():
    # special-token text in a query or document is text, as llama.cpp tokenizes them for reranking
    tok = purelm.load(BERT / "reranker-f32.gguf", backend="numpy").tokenizer
    doc = "a </s><s> b"
    ids = tok.encode_pair("q", doc)
    assert ids == tok.join_pair(tok.encode("q", add_special=False, parse_special=False),
                                tok.encode(doc, add_special=False, parse_special=False))
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 3  # <s> q </s></s> ... </s>


def test_a_pair_without_eos_closes_with_the_separator():
    # add_eos set but no EOS id: llama.cpp's reranking puts the separator there
    from purelm.tokenizer import Tokenizer

    meta = dict(GGUFFile(BERT / "bert-f32.gguf").metadata)
    del meta["tokenizer.ggml.eos_token_id"]
    tok = Tokenizer.from_gguf_metadata(meta)
    q, d = tok.encode("what sat", add_special=False), tok.encode("the cat", add_special=False)
    assert tok.encode_pair("what sat", "the cat") == [tok.bos_id, *q, tok.sep_id, *d, tok.sep_id]


def test_many_short_inputs_keep_the_cache_small():
    # each packed input is a sequence of whole KV blocks: a pass holds at most n_batch positions of them
    from purelm.backends.kv_cache import BLOCK
    from purelm.embeddings import N_BATCH

    for path in (BERT / "bert-q8_0.gguf", FIXTURES / "llama-q8_0.gguf"):
        llm = purelm.load(path, backend="numpy", n_ctx=64)
        llm.embed(["a"] * 300)
        assert llm.cache.capacity * BLOCK <= max(N_BATCH, 4 * BLOCK)


def test_ranking_needs_a_classification_head(tmp_path):
    for path in (BERT / "bert-q8_0.gguf", FIXTURES / "llama-q8_0.gguf"):
        with pytest.raises(UsageError, match="classification head"):
            purelm.load(path, backend="numpy").rerank("q", ["d"])
    bad = rewrite_gguf(BERT / "reranker-f32.gguf", tmp_path / "r.gguf",
                       tensors={"cls.output.weight": np.zeros((1, 32), np.float32)})
    with pytest.raises(FormatError, match="cls.output.weight"):
        purelm.load(bad, backend="numpy")


# -- the CLI and the server

def test_cli_embed_and_generate_refusal(capsys):
    from purelm.cli import main

    model = str(BERT / "bert-q8_0.gguf")
    assert main(["embed", model, "--backend", "numpy", "--pooling", "cls", TEXTS[1]]) == 0
    h = REF["q8_0_hidden1"][0].astype(np.float64)
    np.testing.assert_allclose(json.loads(capsys.readouterr().out), h / np.linalg.norm(h), atol=1e-5)
    assert main(["generate", "-m", model, "--backend", "numpy", "hi"]) != 0
    err = capsys.readouterr().err
    assert "embedding model" in err and "Traceback" not in err


def test_server_serves_embeddings_only():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from purelm.server import ServerConfig, create_app

    llm = purelm.load(BERT / "bert-q8_0.gguf", backend="numpy", n_ctx=256)
    want = llm.embed(TEXTS[:2])
    with TestClient(create_app(llm, ServerConfig(parallel=2))) as client:
        r = client.post("/v1/embeddings", json={"input": TEXTS[:2]})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, want, atol=1e-6)
        r = client.post("/v1/embeddings", json={"input": "word " * 80})
        assert r.status_code == 400 and "learned positions" in r.json()["error"]["message"]
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = client.post(path, json=body)
            assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"], r.text
        r = client.post("/v1/embeddings", json={"input": TEXTS[2]})
        assert r.status_code == 200
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported"


def test_server_reranks_as_llama_server():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from purelm.server import ServerConfig, create_app

    llm = purelm.load(BERT / "reranker-q8_0.gguf", backend="numpy", n_ctx=64)
    query, docs = PAIRS[0][0], [PAIRS[0][1], PAIRS[1][1], "the mat"]
    want = llm.rerank(query, docs)
    order = sorted(range(3), key=lambda i: -want[i])
    with TestClient(create_app(llm, ServerConfig(parallel=2))) as client:
        r = client.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 2, "return_documents": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == order[:2]
        for x in body["results"]:
            assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-6)
            assert x["document"] == {"text": docs[x["index"]]}
        assert body["usage"]["prompt_tokens"] == sum(len(llm.tokenizer.encode_pair(query, d)) for d in docs)
        r = client.post("/rerank", json={"query": query, "texts": docs, "return_text": True})  # TEI's form
        assert [x["index"] for x in r.json()] == order and r.json()[0]["text"] == docs[order[0]]
        for body, param in (({"query": 1, "documents": ["x"]}, "query"), ({"query": "q", "documents": []}, "documents"),
                            ({"query": "q", "documents": ["x", 2]}, "documents"),
                            ({"query": "q", "documents": ["x"], "top_n": -1}, "top_n"),
                            ({"query": "q", "documents": ["word " * 40]}, "documents")):
            r = client.post("/reranking", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("name", ["numpy", "numba-2"])
@pytest.mark.parametrize("model", ["bert/bert-q8_0.gguf", "bert/bert-f16.gguf", "llama-q8_0.gguf"])
def test_inputs_embedded_together_equal_each_alone(name, model):
    # LLM.embed packs inputs into shared passes (each its own sequence): the same as one at a time, to
    # the bit where the numba backend's integer kernels run the products (quantized weights), else to
    # float32 rounding (a product of float weights runs all the pass's rows at once)
    llm = purelm.load(FIXTURES / model, backend=BACKENDS[name], n_ctx=64)
    together = llm.embed(TEXTS * 3)
    for i, text in enumerate(TEXTS * 3):
        alone = llm.embed([text])[0]
        if name.startswith("numba") and "q8_0" in model:
            np.testing.assert_array_equal(together[i], alone)
        np.testing.assert_allclose(together[i], alone, rtol=0, atol=2e-6)


def test_cli_rerank(capsys):
    from purelm.cli import main

    model = str(BERT / "reranker-q8_0.gguf")
    query, docs = PAIRS[0][0], [PAIRS[0][1], PAIRS[1][1]]
    want = purelm.load(model, backend="numpy").rerank(query, docs)
    assert main(["rerank", "-m", model, "--backend", "numpy", query, *docs]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines] == sorted(range(2), key=lambda i: -want[i])
    for x in lines:
        assert x["score"] == pytest.approx(want[x["index"]], abs=1e-6) and x["document"] == docs[x["index"]]
    assert main(["rerank", "-m", str(BERT / "bert-q8_0.gguf"), "--backend", "numpy", "q", "d"]) != 0
    assert "classification head" in capsys.readouterr().err


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "numba-1"])
def test_nomic_embeddings_match_llama_cpps(name):
    # nomic-ref.npz holds llama.cpp's own embeddings of the texts (llama-cpp-python, the same f32 file)
    ref = np.load(BERT / "nomic-ref.npz")
    got = purelm.load(BERT / "nomic-f32.gguf", backend=BACKENDS[name]).embed(TEXTS)
    for i in range(len(TEXTS)):
        np.testing.assert_allclose(got[i], ref[f"llamacpp_embedding{i}"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", [{"activation_function": "gelu"}, {"prenorm": True}, {"qkv_proj_bias": True},
                                    {"rotary_emb_fraction": 0.5}, {"moe_every_n_layers": 2},
                                    {"n_positions": 4096}])
def test_nomic_variants_purelm_does_not_run_are_refused(tmp_path, change):
    from purelm.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(BERT / "nomic-hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(change)
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(purelm.PurelmError, match="nomic-bert"):
        convert(hf, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()
