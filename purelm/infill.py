"""Fill-in-the-middle prompts: the code before and after a gap, for a model trained to write the gap.

The prompt is built as llama.cpp's server builds it for `/infill` (`format_prompt_infill`, the
repository-level pattern of Qwen2.5-Coder's report), so that an editor plug-in written for llama.cpp
gets the same prompt, token for token:

    [FIM_REP]myproject\n [FIM_SEP]name\n text ... [FIM_SEP]filename\n
    [BOS] [FIM_PRE]prefix prompt [FIM_SUF]suffix [FIM_MID]

with at most 3/4 of a batch of the prefix's last tokens, the suffix's first tokens in the rest of a
quarter batch, and the extra files' last tokens in what the context has left. Files without FIM_REP /
FIM_SEP tokens get the extra files as snippets after a text separator.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import UsageError

REPO_NAME = "myproject"  # llama.cpp's placeholders for the repository and the current file
FILE_NAME = "filename"
SNIPPET = "\n\n--- snippet ---\n\n"
N_BATCH = 2048  # llama-server's default batch (-b): the budgets below are parts of it


def check_fim(tokenizer: Any) -> None:
    """A UsageError naming what is missing when the vocabulary has no fill-in-the-middle tokens."""
    missing = [name for name in ("prefix", "suffix", "middle")
               if getattr(tokenizer, f"fim_{name[:3]}_id") is None]
    if missing:
        raise UsageError(f"this model has no fill-in-the-middle {'/'.join(missing)} token: it cannot fill a gap "
                         "(code models such as Qwen2.5-Coder, CodeLlama, DeepSeek-Coder or StarCoder can)")


def infill_ids(tokenizer: Any, prefix: str, suffix: str, prompt: str = "",
               extra: Sequence[tuple[str, str]] = (), n_batch: int = N_BATCH, n_ctx: int = 4096,
               n_predict: int = -1) -> list[int]:
    """The token ids of a fill-in-the-middle prompt (see the module's docstring): `prefix` and
    `suffix` around the gap, `prompt` (text typed at the gap) after the prefix, `extra` files as
    (filename, text) before it all. `n_batch`, `n_ctx` and `n_predict` set the budgets as llama.cpp's
    server options of those names do (its defaults: 2048 tokens a batch, no limit on the reply)."""
    check_fim(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special=False, parse_special=False)

    extra_ids: list[int] = []
    if tokenizer.fim_rep_id is not None:
        extra_ids += [tokenizer.fim_rep_id, *encode(REPO_NAME + "\n")]
    for filename, text in extra:
        if tokenizer.fim_sep_id is not None:
            extra_ids += [tokenizer.fim_sep_id, *encode(filename + "\n")]
        else:
            extra_ids += encode(SNIPPET)
        extra_ids += encode(text)
    if tokenizer.fim_sep_id is not None:
        extra_ids += [tokenizer.fim_sep_id, *encode(FILE_NAME + "\n")]

    prefix_ids, suffix_ids = encode(prefix), encode(suffix)
    prompt_ids = tokenizer.encode(prompt, add_special=False, parse_special=True)
    n_prefix = min(len(prefix_ids), 3 * (n_batch // 4))
    n_suffix = min(len(suffix_ids), max(0, n_batch // 4 - (2 + len(prompt_ids))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_ids))

    ids = [tokenizer.fim_pre_id, *prefix_ids[len(prefix_ids) - n_prefix:], *prompt_ids]
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids.insert(0, tokenizer.bos_id)
    ids[:0] = extra_ids[len(extra_ids) - n_extra:]
    return [*ids, tokenizer.fim_suf_id, *suffix_ids[:n_suffix], tokenizer.fim_mid_id]
