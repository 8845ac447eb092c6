"""llama.cpp's own samplers on given logits: the reference for purelm.sampling's filters and Mirostat.

Run as a script with llama-cpp-python's package importable and LLAMA_CPP_LIB_PATH at a llama.cpp build
(tests/test_sampling.py runs it in a child process where ../shared/peers/build-llama-cpp.sh has built
one). It reads cases (JSON) on stdin and writes, per case, what llama.cpp's chain left:

- "filters": llama.cpp's default chain without penalties (top-n-sigma, top-k, typical, top-p, min-p, XTC
  with probability 1, temperature): the ids left, likeliest first, and their probabilities;
- "mirostat" (1 or 2): per step, the candidates the step drew from and the token it drew, steps run in
  one sampler so that its mu carries over;
- "dry": the penalty DRY takes from each token's logit after a history of tokens, with the
  vocabulary of a model file (its sequence breakers are found among the tokens' texts).

    # the committed reference:
    python tests/llama_samplers.py --write tests/fixtures/samplers.npz --dry-model SMOLLM2.gguf

(there the logits are one float16 array, the cases' rows in order: 1 row a "filters" case, 6 a Mirostat one).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys

import numpy as np


TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def _array(lc, logits: np.ndarray):
    data = np.zeros(len(logits), TOKEN_DATA)
    data["id"], data["logit"] = np.arange(len(logits)), logits
    ptr = data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
    return data, lc.llama_token_data_array(ptr, len(logits), -1, False)


def _items(arr) -> np.ndarray:
    """The array's entries as llama.cpp left them (a sampler may move its start: read from arr.data)."""
    base = ctypes.cast(arr.data, ctypes.c_void_p).value
    return np.frombuffer((ctypes.c_char * (arr.size * TOKEN_DATA.itemsize)).from_address(base), TOKEN_DATA).copy()


def _left(arr) -> tuple[list[int], list[float]]:
    left = _items(arr)
    items = [(int(i), float(x)) for i, x in zip(left["id"], left["logit"])]
    items = [(i, x) for i, x in items if x != float("-inf")]
    items.sort(key=lambda t: (-t[1], t[0]))
    x = np.array([v for _, v in items], np.float64)
    p = np.exp(x - x.max())
    return [i for i, _ in items], (p / p.sum()).tolist()


def _bindings():
    """llama-cpp-python's ctypes bindings (llama_cpp.llama_cpp) alone: its package's __init__ imports the
    high-level API and its dependencies (diskcache, ...), which the tests' environment need not have."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("llama_cpp")  # found on the path, not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llama-cpp-python's llama_cpp package is not on the path (PYTHONPATH)")
    package = types.ModuleType("llama_cpp")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp")


def run(cases: list[dict]) -> list[dict]:
    lc = _bindings()
    lc.llama_backend_init()
    out, vocabs = [], {}
    for case in cases:
        if case["kind"] == "dry":
            out.append({"penalties": _dry(lc, vocabs, case)})
            continue
        logits = [np.asarray(row, np.float32) for row in case["logits"]]  # float16 values: exact in JSON
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        if case["kind"] == "filters":
            bias = case.get("logit_bias", {})
            if bias:
                items = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(int(k), v) for k, v in bias.items()])
                add(lc.llama_sampler_init_logit_bias(len(logits[0]), len(bias), items))
            add(lc.llama_sampler_init_top_n_sigma(case["top_n_sigma"]))
            add(lc.llama_sampler_init_top_k(case["top_k"]))
            add(lc.llama_sampler_init_typical(case["typical_p"], 0))
            add(lc.llama_sampler_init_top_p(case["top_p"], 0))
            add(lc.llama_sampler_init_min_p(case["min_p"], 0))
            add(lc.llama_sampler_init_xtc(1.0 if case["xtc"] else 0.0, case["xtc_threshold"], 0, 1))
            add(lc.llama_sampler_init_temp(case["temperature"]))
            data, arr = _array(lc, logits[0])
            lc.llama_sampler_apply(chain, ctypes.byref(arr))
            ids, probs = _left(arr)
            out.append({"ids": ids, "probs": probs})
        else:
            add(lc.llama_sampler_init_temp(case["temperature"]))
            if case["kind"] == "mirostat1":
                add(lc.llama_sampler_init_mirostat(len(logits[0]), case["seed"], case["tau"], case["eta"], 100))
            else:
                add(lc.llama_sampler_init_mirostat_v2(case["seed"], case["tau"], case["eta"]))
            steps = []
            for row in logits:
                data, arr = _array(lc, row)
                lc.llama_sampler_apply(chain, ctypes.byref(arr))
                ids, _ = _left(arr)
                steps.append({"ids": ids, "token": int(_items(arr)["id"][arr.selected])})
            out.append({"steps": steps})
        lc.llama_sampler_free(chain)
    return out


def _dry(lc, vocabs: dict, case: dict) -> dict[str, float]:
    if case["model"] not in vocabs:
        params = lc.llama_model_default_params()
        params.vocab_only = True
        model = lc.llama_model_load_from_file(case["model"].encode(), params)
        assert model, case["model"]
        vocabs[case["model"]] = (model, lc.llama_model_get_vocab(model))
    vocab = vocabs[case["model"]][1]
    texts = [t.encode() for t in case["breakers"]]
    breakers = (ctypes.c_char_p * max(1, len(texts)))(*texts)
    dry = lc.llama_sampler_init_dry(vocab, case["multiplier"], case["base"], case["allowed"], case["last_n"],
                                    breakers, len(texts))
    for token in case["history"]:
        lc.llama_sampler_accept(dry, token)
    data, arr = _array(lc, np.zeros(lc.llama_vocab_n_tokens(vocab), np.float32))
    lc.llama_sampler_apply(dry, ctypes.byref(arr))
    lc.llama_sampler_free(dry)
    items = _items(arr)
    hit = items[items["logit"] != 0]
    return {str(int(i)): -float(x) for i, x in zip(hit["id"], hit["logit"])}


DRY_PHRASES = ["Hello world", "\n", ": ", "\"quoted\"", " *bold*", " the end", "###", " and so on", " abab",
               " the cat sat", "\n\n", " x: 1", " ab"]
DRY_BREAKERS = [["\n", ":", "\"", "*"], ["\n", " the end", "###", "ab"], [], [" cat sat"]]
# characters of several bytes, which tokens may end inside (a breaker's rest then starts mid-character)
WIDE_PHRASES = ["Hello world", " café", "—", " the end", " 20€", "€uro", " ünïcödé", "日本語", "\n"]
WIDE_BREAKERS = [["—", "日本"], ["€uro", "é", "\n"]]


def make_dry_cases(tokenizer, model: str, seed: int, n: int, phrases=DRY_PHRASES, breakers=DRY_BREAKERS) -> list[dict]:
    """Histories of phrases that repeat, with and without sequence breakers, over the tokenizer's ids."""
    rng = np.random.default_rng(seed)
    phrases = [tokenizer.encode(t, add_special=False, parse_special=False) for t in phrases]
    cases = []
    for _ in range(n):
        pieces = [phrases[i] for i in rng.choice(len(phrases), rng.integers(2, 6), replace=False)]
        history, length = [], rng.integers(8, 150)
        while len(history) < length:
            history += pieces[rng.integers(len(pieces))] if rng.random() < 0.9 else [int(rng.integers(1000))]
        cases.append({"kind": "dry", "model": model, "history": [int(t) for t in history],
                      "breakers": breakers[rng.integers(len(breakers))],
                      "multiplier": float(rng.uniform(0.3, 2)), "base": float(rng.choice([1.0, 1.3, 1.75, 3.0, 40.0])),
                      "allowed": int(rng.integers(0, 5)), "last_n": int(rng.choice([8, 32, 64, 1000]))})
    return cases


def make_cases(seed: int, n: int, vocab: int = 256) -> list[dict]:
    """Logits shaped like a model's (a few likely tokens, a long tail), and settings drawn around the
    ones people use: each filter on alone and several at once."""
    rng = np.random.default_rng(seed)

    def row():
        x = np.sort(rng.standard_normal(vocab))[::-1] * rng.uniform(1, 4)
        x[:rng.integers(1, 6)] += rng.uniform(0, 6)
        return rng.permutation(x).astype(np.float16).astype(np.float32).tolist()

    cases = []
    for i in range(n):
        kind = ["filters", "filters", "mirostat1", "mirostat2"][i % 4]
        if kind == "filters":
            on = rng.random(5) < 0.5 if i >= 8 else np.arange(5) == i % 5
            # llama.cpp's typical-p after top-n-sigma takes the -inf logits the latter leaves in the array
            # into its entropy (0 * log 0: NaN) and keeps tokens at random: never both
            on[2] &= not on[0]
            logits = row()
            if not on[2] and rng.random() < 0.3:  # a grammar's mask (not with typical-p, for the same reason)
                for i in rng.choice(vocab, vocab // 2, replace=False)[1:]:
                    logits[i] = float("-inf")
            bias = {str(i): float(rng.choice([-np.inf, rng.uniform(-5, 5)]))
                    for i in rng.choice(vocab, rng.integers(0, 4), replace=False)} if not on[2] else {}
            cases.append({"kind": kind, "logits": [logits], "logit_bias": bias,
                          "temperature": float(rng.choice([0.0, 0.5, 0.8, 1.0, 1.5])),
                          "top_n_sigma": float(rng.uniform(0.5, 3)) if on[0] else -1.0,
                          "top_k": int(rng.integers(5, 200)) if on[1] else 0,
                          "typical_p": float(rng.uniform(0.2, 0.95)) if on[2] else 1.0,
                          "top_p": float(rng.uniform(0.5, 0.99)) if on[3] else 1.0,
                          "min_p": float(rng.uniform(0.01, 0.2)) if rng.random() < 0.5 else 0.0,
                          "xtc": bool(on[4]), "xtc_threshold": float(rng.uniform(0.02, 0.5))})
        else:
            cases.append({"kind": kind, "logits": [row() for _ in range(6)], "seed": int(rng.integers(1 << 30)),
                          "temperature": float(rng.choice([0.7, 1.0, 1.3])), "tau": float(rng.uniform(2, 8)),
                          "eta": float(rng.uniform(0.05, 0.5))})
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", help="make cases, run them and write cases and results to this .npz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--dry-model", help="with --write: DRY cases over this model's vocabulary too")
    a = ap.parse_args()
    if a.write:
        cases = make_cases(a.seed, a.cases)
        if a.dry_model:
            from purelm.tokenizer import Tokenizer

            cases += make_dry_cases(Tokenizer.from_file(a.dry_model), a.dry_model, a.seed, a.cases)
        results = run(cases)
        logits = np.array([row for c in cases for row in c.pop("logits", [])], np.float16)  # rows in case order
        for c in cases:
            c.pop("model", None)  # (the tests give their own path)
        np.savez_compressed(a.write, logits=logits, cases=json.dumps(cases), results=json.dumps(results),
                            made_with=f"tests/llama_samplers.py --write {a.write} --seed {a.seed} --cases {a.cases}"
                                      f"{' --dry-model SmolLM2' if a.dry_model else ''}"
                                      " (llama.cpp of llama-cpp-python 0.3.36)")
    else:
        json.dump(run(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
