"""Split GGUF files: llama.cpp's gguf-split convention (`model-00001-of-00003.gguf`).

A split model is several GGUF files. The first holds all the metadata and some tensors; every shard
holds `split.no` (its index from 0, u16), `split.count` (u16) and `split.tensors.count` (the tensors of
all shards together, i32), and the tensors it carries, at offsets inside its own data section. The
names are PREFIX-NNNNN-of-MMMMM.gguf with NNNNN counted from 1 (llama_split_path); llama.cpp opens the
first and derives the others' names from it.

Opening the first shard (`GGUFFile`) opens them all as one model (`join_shards`): every shard is
parsed and checked on its own (offsets inside that shard), then numbering, counts and tensor names are
checked across shards. Each tensor stays a view into its own shard's memory map. The joined view's
metadata is the first shard's without the split.* keys: the model it describes is one file's, and a
writer that copies it (quantize, convert) writes a correct unsplit file.

`write_split` writes a model as shards, splitting by tensor bytes as gguf-split does (`--split-max-size`
counts tensor data, padded, not the metadata); `rewrite` splits or merges an existing GGUF.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import FormatError, UsageError
from .gguf import DEFAULT_ALIGNMENT, GGUFFile, GGUFWriter, ValueType

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_SHARDS = 0xFFFF  # split.count is a u16


def shard_path(prefix: str, index: int, count: int) -> str:
    """The file name of shard `index` (from 0) of `count`, as llama_split_path writes it."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def shard_paths(first: str, count: int) -> list[str]:
    """All shard names of a split model from its first shard's name (llama_split_prefix)."""
    suffix = f"-{1:05d}-of-{count:05d}.gguf"
    if not first.endswith(suffix) or len(first) == len(suffix):
        raise FormatError(first, "file name", f"split.count is {count}, so the first shard must be named "
                          f"PREFIX{suffix} (the other shards' names come from it)")
    prefix = first[: -len(suffix)]
    return [shard_path(prefix, i, count) for i in range(count)]


def is_shard_name(path: str | os.PathLike) -> bool:
    return SHARD_NAME.match(os.path.basename(str(path))) is not None


def _split_int(f: GGUFFile, key: str, kinds: tuple[ValueType, ...], lo: int, hi: int) -> int | None:
    """A split key's value, checked: of the type llama.cpp writes and in range; None when absent."""
    if key not in f.metadata:
        return None
    value = f.metadata[key]
    if f.metadata.types[key] not in kinds or not lo <= value <= hi:
        raise FormatError(f.path, key, f"is {value!r} ({f.metadata.types[key].name.lower()}); it must be an "
                          f"integer from {lo} to {hi}")
    return int(value)


_INTS = (ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32, ValueType.INT32,
         ValueType.UINT64, ValueType.INT64)


def _hide_split_keys(f: GGUFFile) -> None:
    meta = f.metadata
    for key in SPLIT_KEYS:
        meta._values.pop(key, None)
        meta.types.pop(key, None)


def join_shards(first: GGUFFile, open_shard: Callable[[str], GGUFFile] | None = None) -> None:
    """Make `first` (an opened GGUF holding split.* keys) the whole model: add the other shards'
    tensors, check the set, record the shard paths in `first.shards`, total size in `file_size`."""
    open_shard = open_shard or (lambda path: GGUFFile(path, join=False))
    count = _split_int(first, SPLIT_COUNT, _INTS, 0, MAX_SHARDS)
    no = _split_int(first, SPLIT_NO, _INTS, 0, MAX_SHARDS)
    total = _split_int(first, SPLIT_TENSORS, _INTS, 0, 1 << 31)
    if count is None or count <= 1:  # one file (llama-gguf-split --merge writes split.count 0)
        if no not in (None, 0):
            raise FormatError(first.path, SPLIT_NO, f"is {no} but split.count is {count}: a one-file model's "
                              "shard number must be 0")
        if total is not None and total != len(first.tensors):
            raise FormatError(first.path, SPLIT_TENSORS, f"says {total} tensors but the file holds "
                              f"{len(first.tensors)}")
        _hide_split_keys(first)
        return
    if no != 0:
        name = SHARD_NAME.match(os.path.basename(first.path))
        hint = f" ({name['prefix']}-00001-of-{count:05d}.gguf)" if name else ""
        raise FormatError(first.path, SPLIT_NO, f"is {no}: this is shard {(no or 0) + 1} of {count}; open the "
                          f"first shard{hint}" if no is not None else "is missing from a split model's shard")
    if total is None:
        raise FormatError(first.path, SPLIT_TENSORS, f"is missing (split.count is {count})")
    paths = shard_paths(first.path, count)
    shards = [first]
    for i, path in enumerate(paths[1:], 1):
        if not os.path.exists(path):
            raise FormatError(first.path, "split", f"shard {i + 1} of {count} is missing: {path}")
        shard = open_shard(path)
        shards.append(shard)
        for key, want in ((SPLIT_NO, i), (SPLIT_COUNT, count), (SPLIT_TENSORS, total)):
            got = _split_int(shard, key, _INTS, 0, 1 << 31)
            if got is None:
                raise FormatError(path, key, f"is missing (shard {i + 1} of a split model)")
            if got != want:
                raise FormatError(path, key, f"is {got}, but {first.path} makes it {want}")
        for name, t in shard.tensors.items():
            if name in first.tensors:
                raise FormatError(path, f"tensor {name!r}", "is also in an earlier shard")
            first.tensors[name] = t
    if len(first.tensors) != total:
        raise FormatError(first.path, SPLIT_TENSORS, f"says {total} tensors but the {count} shards hold "
                          f"{len(first.tensors)}")
    first.shards = paths
    first.file_size = sum(s.file_size for s in shards)
    first._shard_files = shards[1:]  # keep their maps (and file handles' owners) alive with the model
    _hide_split_keys(first)


# ----------------------------------------------------------------------------------------------- writing


def parse_size(text: str) -> int:
    """--split-max-size: N with M (10^6 bytes) or G (10^9) as llama-gguf-split reads it; also K (10^3)
    and plain bytes as llama.cpp's convert_hf_to_gguf.py does."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    s = text.strip()
    scale = units.get(s[-1:].upper(), 1) if s else 1
    digits = s[:-1] if scale != 1 else s
    if not re.fullmatch(r"[0-9]{1,15}", digits) or int(digits) <= 0:
        raise UsageError(f"--split-max-size {text!r}: give a positive whole number with K, M or G "
                         "(10^3, 10^6, 10^9 bytes), e.g. 50M or 2G, or a number of bytes")
    return int(digits) * scale


def plan(nbytes: list[int], max_size: int, alignment: int = DEFAULT_ALIGNMENT) -> list[int]:
    """Shard index of each tensor: a new shard starts where the next tensor's padded bytes would take
    the current one past max_size (gguf-split's rule), and no shard is empty (a tensor larger than
    max_size gets a shard of its own)."""
    out, shard, used = [], 0, 0
    for n in nbytes:
        n += -n % alignment
        if used and used + n > max_size:
            shard, used = shard + 1, 0
        used += n
        out.append(shard)
    return out


def output_prefix(out: str | os.PathLike) -> str:
    """PREFIX of the shards for an output path: out.gguf writes out-00001-of-0000N.gguf (as gguf-py's
    writer names them); a name without .gguf is the prefix itself (as llama-gguf-split takes it)."""
    out = str(out)
    return out[: -len(".gguf")] if out.lower().endswith(".gguf") and len(out) > len(".gguf") else out


def write_split(w: GGUFWriter, out: str | os.PathLike, max_size: int,
                progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write the model w holds (its metadata and pending tensors; w.path is ignored) as shards of at most
    max_size tensor bytes; returns the paths written. One shard: a plain file at `out`, no split keys
    (as gguf-py's writer does). Shards are written under temporary names and renamed only once all are
    complete, so an error or interrupt leaves none behind."""
    if max_size <= 0:
        raise UsageError(f"split size must be positive, got {max_size}")
    if not w.tensors:
        raise UsageError("a model without tensors cannot be split")
    where = plan([t.nbytes for t in w.tensors], max_size, w.alignment)
    count = where[-1] + 1
    if count > MAX_SHARDS:
        raise UsageError(f"--split-max-size {max_size} would make {count} shards (at most {MAX_SHARDS})")
    if count == 1:
        paths = [str(out)]
    else:
        prefix = output_prefix(out)
        paths = [shard_path(prefix, i, count) for i in range(count)]
    total = sum(t.nbytes + -t.nbytes % w.alignment for t in w.tensors)
    done, temps = 0, []
    try:
        for i, path in enumerate(paths):
            shard = GGUFWriter(f"{path}.{os.getpid()}.shard.tmp", w.alignment)
            if i == 0:
                shard.kv.update({k: v for k, v in w.kv.items() if k not in SPLIT_KEYS})
            if count > 1:
                shard.add(SPLIT_NO, i, ValueType.UINT16)
                shard.add(SPLIT_COUNT, count, ValueType.UINT16)
                shard.add(SPLIT_TENSORS, len(w.tensors), ValueType.INT32)
            shard.tensors = [t for t, s in zip(w.tensors, where) if s == i]
            temps.append(shard.path)
            base = done
            shard.write(None if progress is None else lambda d, _t, base=base: progress(base + d, total))
            done += sum(t.nbytes + -t.nbytes % w.alignment for t in shard.tensors)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return paths


def copy_model(f: GGUFFile, out: str | os.PathLike) -> GGUFWriter:
    """A writer holding f's metadata (types kept) and tensors (bytes as they are)."""
    w = GGUFWriter(out, f.alignment)
    for key in f.metadata:
        w.add(key, f.metadata[key], f.metadata.types[key], f.metadata.array_types.get(key))
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    return w


def rewrite(src: str | os.PathLike, out: str | os.PathLike, max_size: int | None,
            progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Split a GGUF model (a split one is read whole) into shards of at most max_size tensor bytes, or
    with max_size None merge it into one file. Tensors are copied as they are."""
    if Path(out).is_dir():
        raise UsageError(f"{out}: is a folder; give the path of the .gguf file to write")
    with GGUFFile(src) as f:
        if os.path.abspath(out) in map(os.path.abspath, f.shards):
            raise UsageError(f"{out}: is the model being read; write to another path")
        w = copy_model(f, out)
        if max_size is None:
            tmp = f"{out}.{os.getpid()}.merge.tmp"
            w.path = tmp
            try:
                w.write(progress)
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return [str(out)]
        return write_split(w, out, max_size, progress)
