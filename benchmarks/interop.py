"""Interchange check: llama.cpp (llama-cpp-python, the `bench` extra) runs GGUF files that `purelm convert`
wrote, and agrees with purelm on the top-1 token at every position; for the embedding models (encoders,
tests/fixtures/bert: BERT, DistilBERT, RoBERTa, XLM-RoBERTa, nomic-bert) on the tokens and the embeddings.
Prints JSON.

    python benchmarks/interop.py [--archs llama gpt2 qwen2 ...] [--types f32 f16 q8_0] [--no-embeddings]
                                 [--llama-server PATH]   # also the reranker, against llama-server --reranking

Set LLAMA_CPP_LIB_PATH to use another libllama build (see benchmarks/README.md on AMX crashes).
For falcon, gptneox and mpt the logits differ by ~1e-3 even in f32: purelm computes the exact (erf) GELU
their checkpoints were trained with, llama.cpp the tanh approximation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    # f32 KV cache, so that only llama.cpp's matmul rounding (q8 activations for quantized weights) differs
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def embedding_results(types: list[str], backend: str) -> list[dict]:
    """purelm's and llama.cpp's embeddings (L2-normalized, the file's pooling) of the encoder fixtures'
    texts (BERT, DistilBERT, RoBERTa: tests/fixtures/bert), and their tokens."""
    import llama_cpp

    import purelm

    texts = ["The quick brown fox jumps over the lazy dog.", "hello world", "a",
             "Embeddings: Héllo, WORLD! 12345 unbelievable tokenization"]
    out = []
    for arch, qtype in ((a, t) for a in ("bert", "distilbert", "roberta", "xlm-roberta", "nomic") for t in types):
        path = FIX / "bert" / f"{arch}-{qtype}.gguf"
        if not path.exists():  # (the other families have f32 and q8_0 fixtures only)
            continue
        ours_model = purelm.load(path, backend=backend)
        # a file without bert.pooling_type: llama.cpp returns every token's vector, purelm their mean
        pooled = f"{ours_model.metadata['general.architecture']}.pooling_type" in ours_model.metadata
        pooling = {} if pooled else {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
        theirs_model = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=64, n_threads=1, verbose=False,
                                       **pooling)
        theirs = np.array([theirs_model.embed(t, normalize=True) for t in texts], np.float32)
        ours = ours_model.embed(texts)
        out.append({"arch": arch, "type": qtype, "texts": len(texts),
                    "tokens_equal": all(ours_model.tokenize(t) == theirs_model.tokenize(t.encode()) for t in texts),
                    "max_abs_diff": float(np.abs(ours - theirs).max()),
                    "min_cosine": float((ours * theirs).sum(1).min())})
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def rerank_results(types: list[str], backend: str, server: str) -> list[dict]:
    """The reranker fixture (tests/fixtures/bert/reranker-*) scoring documents for a query in purelm
    and in `llama-server --reranking` (its /rerank route)."""
    import socket
    import subprocess
    import time
    import urllib.request

    import purelm

    query = "what sat on the mat?"
    docs = ["the cat sat on the mat", "hello world", "The quick brown fox jumps over the lazy dog.", "a"]
    out = []
    for qtype in types:
        path = FIX / "bert" / f"reranker-{qtype}.gguf"
        if not path.exists():
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([server, "-m", str(path), "--reranking", "--port", str(port), "-t", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            body = json.dumps({"query": query, "documents": docs}).encode()
            for _ in range(300):
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/rerank", body,
                                                 {"content-type": "application/json"})
                    answer = json.load(urllib.request.urlopen(req, timeout=30))
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise SystemExit("llama-server did not answer")
        finally:
            proc.terminate()
            proc.wait(30)
        theirs = [0.0] * len(docs)
        for r in answer["results"]:
            theirs[r["index"]] = r["relevance_score"]
        ours = purelm.load(path, backend=backend).rerank(query, docs)
        out.append({"arch": "reranker", "type": qtype, "documents": len(docs), "purelm": ours, "llama_cpp": theirs,
                    "max_abs_diff": float(np.abs(np.subtract(ours, theirs)).max()),
                    "same_order": bool(np.array_equal(np.argsort(ours), np.argsort(theirs))),
                    "prompt_tokens_equal": answer["usage"]["prompt_tokens"] == sum(
                        len(purelm.load(path, backend="numpy").tokenizer.encode_pair(query, d)) for d in docs)})
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=["llama", "mistral_gqa", "qwen2", "gpt2", "qwen3", "olmo2",
                                                    "smollm3", "llama3rope", "phi4", "nemo"])
    ap.add_argument("--types", nargs="*", default=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--no-embeddings", action="store_true", help="skip the embedding models (encoders)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: also compare the reranker's scores")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import purelm

    results = []
    for arch in a.archs:
        for qtype in a.types:
            path = FIX / f"{arch}-{qtype}.gguf"
            ids = np.load(FIX / f"{arch}-ref-f32.npz")["ids"].tolist()
            ours = purelm.load(path, backend=a.backend).logits(ids)
            theirs = llama_cpp_logits(path, ids)
            a1, b1 = ours.argmax(-1), theirs.argmax(-1)
            differ = np.nonzero(a1 != b1)[0]
            # Where the top-1 differs: how far apart the two candidates are in purelm's own logits. A gap
            # below the logits' max difference is a near-tie flipped by rounding, not a disagreement
            # about the file.
            gaps = [float(ours[i, a1[i]] - ours[i, b1[i]]) for i in differ]
            results.append({"arch": arch, "type": qtype, "positions": len(ids),
                            "top1_agreement": float(np.mean(a1 == b1)),
                            "max_abs_diff": float(np.abs(ours - theirs).max()),
                            "logit_scale": float(np.abs(theirs).max()),
                            "differing_positions_gap": gaps})
            print(json.dumps(results[-1]), file=sys.stderr)
    embeddings = [] if a.no_embeddings else embedding_results(a.types, a.backend)
    rerank = rerank_results(a.types, a.backend, a.llama_server) if a.llama_server else []
    json.dump({"results": results, "embeddings": embeddings, "rerank": rerank, "all_top1_equal": all(r["top1_agreement"] == 1.0 for r in results),
               "all_differences_are_near_ties": all(g < r["max_abs_diff"] for r in results
                                                    for g in r["differing_positions_gap"])},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
