"""Write tests/fixtures/tokenizer_spm_llama_cpp.json: llama.cpp's ids (llama-cpp-python, the `bench`
extra) for the SentencePiece test corpus on tests/fixtures/tok_llama_spm.gguf. llama.cpp and
sentencepiece put a "▁" before every run of text (also one that starts with a space, and text after a
special token); transformers' GGUF loader does not, so both references are kept.

    python tools/make_llama_cpp_token_fixture.py
"""
import json
from pathlib import Path

import llama_cpp

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> None:
    llm = llama_cpp.Llama(model_path=str(FIX / "tok_llama_spm.gguf"), vocab_only=True, verbose=False)
    cases = json.loads((FIX / "tokenizer_spm.json").read_text(encoding="utf-8"))["cases"]
    out = {c["text"]: llm.tokenize(c["text"].encode(), add_bos=True, special=True) for c in cases}
    (FIX / "tokenizer_spm_llama_cpp.json").write_text(json.dumps(
        {"made_with": f"llama-cpp-python {llama_cpp.__version__}", "ids": out},
        ensure_ascii=False, indent=0), encoding="utf-8")


if __name__ == "__main__":
    main()
