"""Helpers of the batch tests (test_batch.py, test_torch_backend.py): a script of passes mixing prompt
chunks, decode tokens and a fork, run batched and each sequence alone."""
import numpy as np


def tokens(n, seed):
    return np.random.default_rng(seed).integers(1, 200, n)


def alone(model, script):
    """Each sequence of `script` (a list of passes, each {seq: ids, or ("fork", parent)}) run on its own
    in its own cache, in the same chunks; a fork first replays its parent's chunks up to the fork.
    Returns {seq: [logits of each of its own chunks]}."""
    chunks, own = {}, {}
    for step in script:
        for seq, ids in step.items():
            if isinstance(ids, tuple):
                chunks[seq], own[seq] = list(chunks[ids[1]]), []
            else:
                chunks.setdefault(seq, []).append(ids)
                own.setdefault(seq, []).append(len(chunks[seq]) - 1)
    out = {}
    for seq in chunks:
        cache = model.new_cache(96)
        logits = [model.forward(np.asarray(ids), cache, all_logits=True) for ids in chunks[seq]]
        out[seq] = [logits[i] for i in own[seq]]
    return out


def batched(model, script):
    cache = model.new_cache(96)
    ids_of = {0: 0}
    out = {}
    for step in script:
        forks = {s: v for s, v in step.items() if isinstance(v, tuple)}
        for seq, (_, parent) in forks.items():
            ids_of[seq] = cache.fork(ids_of[parent])
        runs = [(s, v) for s, v in step.items() if not isinstance(v, tuple)]
        for s, _ in runs:
            if s not in ids_of:
                ids_of[s] = cache.add()
        got = model.forward_batch(cache, [(ids_of[s], v) for s, v in runs], all_logits=True)
        for (s, _), logits in zip(runs, got):
            out.setdefault(s, []).append(logits)
    return out


# A: short prompt; B: a prompt longer than the matrix-vector limit (matrix products); C forks A after
# its second token; D joins late with a prompt chunk while others decode.
SCRIPT = [
    {"A": tokens(5, 1), "B": tokens(20, 2)},
    {"A": tokens(1, 3), "B": tokens(1, 4)},
    {"C": ("fork", "A")},
    {"A": tokens(1, 5), "C": tokens(1, 6), "B": tokens(1, 7), "D": tokens(15, 8)},
    {"C": tokens(3, 9), "A": tokens(1, 10), "D": tokens(1, 11)},
    {"A": tokens(1, 12), "B": tokens(1, 13), "C": tokens(1, 14), "D": tokens(1, 15)},
]
