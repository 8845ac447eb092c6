"""Write tests/fixtures/spm/: a tiny SentencePiece `tokenizer.model` (BPE, byte fallback, 320 pieces) and
sentencepiece's own ids for the tokenizer test corpus, the reference for converting SentencePiece
checkpoints (`purelm convert` -> tokenizer.ggml.model "llama"). Needs `sentencepiece`.

    python tools/make_spm_fixture.py
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_fixtures import CORPUS, SPM_TRAINING_TEXT  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "spm"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        text.write_text(SPM_TRAINING_TEXT * 20, encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            input=str(text), model_writer=model, model_type="bpe", vocab_size=320, byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            num_threads=1, minloglevel=2)
    (OUT / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ref = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "n_pieces": sp.get_piece_size(),
           "cases": [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in CORPUS]}
    (OUT / "reference.json").write_text(json.dumps(ref, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {OUT} ({sp.get_piece_size()} pieces, {len(CORPUS)} strings)")


if __name__ == "__main__":
    main()
