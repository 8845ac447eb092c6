"""LLVM-level helpers numba does not offer: software prefetch, half-precision loads and integer dot
products.

They compile to single instructions (prefetcht0, vcvtph2ps) or short runs of them (vpmaddwd)."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8P = ir.IntType(8).as_pointer()


def _element_ptr(context, builder, array_type, array_value, index):
    array = context.make_array(array_type)(context, builder, array_value)
    return builder.gep(array.data, [index])


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the cache to fetch the line holding array.flat[index] (1-D C array). Never faults, so
    indexes past the end are fine: prefetching a fixed distance ahead needs no bounds test."""
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(_element_ptr(context, builder, signature.args[0], args[0], args[1]), _I8P)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8P, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read, locality 3 (keep in all levels), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of the IEEE half-precision number whose bits are `bits` (uint16)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def bits_to_float(typingctx, bits):
    """Reinterpret uint32 bits as float32 (bf16 is the top half of a float32)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def load_f16(typingctx, array, index):
    """The float32 value of the little-endian f16 stored at byte `index` of a 1-D uint8 array."""
    sig = types.float32(array, index)

    def codegen(context, builder, signature, args):
        ptr = _element_ptr(context, builder, signature.args[0], args[0], args[1])
        half = builder.load(builder.bitcast(ptr, ir.HalfType().as_pointer()), align=1)
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@intrinsic
def load_f32(typingctx, array, index):
    """The float32 stored at byte `index` of a 1-D uint8 array (any alignment)."""
    sig = types.float32(array, index)

    def codegen(context, builder, signature, args):
        ptr = _element_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, ir.FloatType().as_pointer()), align=1)

    return sig, codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers where the CPU has them.

    LLVM's tuning for recent Intel CPUs prefers 256-bit vectors; the quantized kernels run 25-30%
    faster with 512 (measured). The function attribute is per function, so numba's other code keeps
    its defaults; CPUs without AVX-512 ignore it. llvmlite only accepts a fixed list of attribute
    names, hence the raw set.add; if that ever fails, the kernel just keeps 256-bit vectors."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # noqa: BLE001 - a missed speed-up, never an error
            pass
        return context.get_dummy_value()

    return sig, codegen


# -- integer dot products for the decode kernels over "dot" layouts (packing.py): activations rounded
# to int16 per 32 weights, 4-byte groups of weights per row. Written as plain LLVM vector IR (widen,
# multiply, add neighbouring pairs): LLVM selects vpmaddwd + vpaddd on x86 with AVX2, and AVX512-VNNI's
# vpdpwssd where the CPU has it (seen in the kernels' assembly).

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I32 = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(ir.IntType(8), 64)
_EVEN = ir.Constant(ir.VectorType(_I32, 16), list(range(0, 32, 2)))
_ODD = ir.Constant(ir.VectorType(_I32, 16), list(range(1, 32, 2)))
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_PMADDWD = "llvm.x86.avx2.pmadd.wd"


def _declared(builder, name, result, args):
    """The LLVM function `name` (an intrinsic) in the builder's module, declared on first use."""
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(result, args), name)
    return fn


def _broadcast_words(builder, value):
    """An int64 holding 4 int16 -> those 4 repeated 8 times (32 x i16)."""
    v8 = ir.VectorType(_I64, 8)
    vec = builder.insert_element(ir.Constant(v8, ir.Undefined), value, ir.Constant(_I32, 0))
    vec = builder.shuffle_vector(vec, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return builder.bitcast(vec, ir.VectorType(_I16, 32))


def _multiply_add_pairs(builder, acc, w, x):
    """acc (16 x i32) + the sums of neighbouring pairs of w * x (32 x i32 each): vpmaddwd + vpaddd."""
    p = builder.mul(w, x)
    pairs = builder.add(builder.shuffle_vector(p, p, _EVEN), builder.shuffle_vector(p, p, _ODD))
    return builder.add(acc, pairs)


def target_features() -> set[str] | None:
    """The CPU features numba compiles for ($NUMBA_CPU_FEATURES, or the host's when no
    $NUMBA_CPU_NAME is set); None where unknown."""
    try:
        from numba.core import config

        if config.CPU_FEATURES is not None:
            return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
        if config.CPU_NAME not in (None, "host"):
            return None
        import llvmlite.binding as ll

        return {name for name, on in ll.get_host_cpu_features().items() if on}
    except Exception:  # noqa: BLE001 - unknown: the float kernels always work
        return None


def has_int8_dot() -> bool:
    """Whether the int8-activation kernels run here: AVX512-VNNI's vpdpbusd (64 multiply-adds an
    instruction, twice the int16 kernels' vpdpwssd), or AVX2's vpmaddubsw (32 multiply-adds of bytes,
    _byte_pairs: 1.45-1.6x the int16 kernels' speed on an AVX2 Zen 3, benchmarks/README.md) for the
    kinds of int8_kinds()."""
    return has_int8_bytes() or "avx2" in (target_features() or set())


def has_int8_bytes() -> bool:
    """Whether Q8_0's int8 kernel runs here: with vpdpbusd only (its weights enter as w + 128, whose
    pair sums would overflow vpmaddubsw's int16)."""
    return {"avx512vnni", "avx512bw"} <= (target_features() or set())


def int8_kinds() -> tuple[int, ...]:
    """The dot kinds with int8 kernels on this CPU (none where has_int8_dot() is False)."""
    if not has_int8_dot():
        return ()
    return DOT8_KINDS if has_int8_bytes() else (NIBBLE_QUADS, FIVE_QUADS)


def has_int16_dot() -> bool:
    """Whether the int16 dot kernels beat the float32 ones on the target CPU: x86 with AVX2. Measured
    on this project's machine (AVX-512 with VNNI) compiling for it (1.3-1.7x the float32 kernels'
    speed), for skylake-avx512 without VNNI (0.9-1.4x) and for haswell (1.1-1.2x). Other CPUs keep
    the float32 kernels."""
    features = target_features() or set()
    return "avx2" in features


# One call takes all the weight groups of a 32-weight sub-block (16 rows) for 1, 2 or 4 tokens: each
# group is loaded and unpacked once for the tokens, and each token's accumulators stay in registers from
# the first group to the last, stored once (per-group calls that accumulated through memory were
# 1.4-3x slower at 8 tokens: benchmarks/README.md).

# 4-byte weight groups ("quads") per 32-weight sub-block in the dot layouts, which also name the kind:
# nibbles; nibbles + a plane of high bits (5-bit weights); nibbles + two planes of 2-bit pairs (Q6_K);
# a weight a byte (Q8_0).
NIBBLE_QUADS, FIVE_QUADS, SIX_QUADS, BYTE_QUADS = 4, 5, 6, 8
# Kinds from 16 up hold kind % 16 quads: 2-bit weights, 4 a byte (Q2_K: 2 quads; Q3_K: 3, with a plane of
# third bits), both in two 16-weight halves with their own scales; and 4-bit codes of a table of levels
# (IQ4_NL, IQ4_XS: the nibble layout, each code looked up with vpshufb before the multiply).
CRUMB_KIND, CRUMB3_KIND, LEVEL_KIND = 16 + 2, 16 + 3, 16 + NIBBLE_QUADS
# kvalues_iq4nl (ggml-common.h): the IQ4 types' 16 levels, int8
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _row_sums(builder, halves):
    """Accumulators of rows 0-7 and 8-15 (two int32 lanes a row) -> one int32 a row, rows 0-15."""
    a, b = halves
    return builder.add(builder.shuffle_vector(a, b, _EVEN), builder.shuffle_vector(a, b, _ODD))


def _dpbusd(builder, acc, unsigned, signed):
    """acc (16 x i32) + the sums of each 4 neighbouring products unsigned[i] * signed[i] (64 x i8 each):
    AVX512-VNNI's vpdpbusd, called by name (LLVM does not form it from plain IR; measured)."""
    fn = _declared(builder, _VPDPBUSD, _V16I32, [_V16I32] * 3)
    return builder.call(fn, [acc, builder.bitcast(unsigned, _V16I32), builder.bitcast(signed, _V16I32)])


_PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"


def _byte_pairs(builder, unsigned, signed):
    """AVX2's vpmaddubsw on both 32-byte halves of 64 x i8: the sums of neighbouring byte products as
    two 16 x i16 (int16: exact while a pair's sum fits, as unsigned weights of up to 5 bits and
    |x| <= 127 keep it: at most 31 * 127 * 2)."""
    v32, v16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(_I16, 16)
    fn = _declared(builder, _PMADDUBSW, v16, [v32, v32])
    out = []
    for lo in (0, 32):
        pick = ir.Constant(ir.VectorType(_I32, 32), list(range(lo, lo + 32)))
        out.append(builder.call(fn, [builder.shuffle_vector(unsigned, unsigned, pick),
                                     builder.shuffle_vector(signed, signed, pick)]))
    return out


def _widen_pairs(builder, pairs):
    """Two 16 x i16 of pair sums -> 16 x i32 sums of 4 (vpmaddwd by ones): the rows' dots."""
    v16 = ir.VectorType(_I16, 16)
    fn = _declared(builder, _PMADDWD, ir.VectorType(_I32, 8), [v16, v16])
    ones = ir.Constant(v16, [1] * 16)
    halves = [builder.call(fn, [p, ones]) for p in pairs]
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I32, list(range(16))))


def _broadcast_bytes(builder, value):
    """An int32 holding 4 int8 -> those 4 repeated 16 times (64 x i8)."""
    v4 = ir.VectorType(ir.IntType(8), 4)
    return builder.shuffle_vector(builder.bitcast(value, v4), ir.Constant(v4, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, 64), [i % 4 for i in range(64)]))


def _level_lookup(builder, codes):
    """IQ4_LEVELS[codes] for 64 codes < 16 (64 x i8): vpshufb, one 512-bit one with AVX512-BW, else two
    256-bit ones (the table repeated in every 128-bit lane, as vpshufb indexes within a lane)."""
    table = [IQ4_LEVELS[i % 16] for i in range(64)]
    features = target_features() or set()
    if "avx512bw" in features:
        name, vt, parts = "llvm.x86.avx512.pshuf.b.512", _V64I8, 1
    else:
        name, vt, parts = "llvm.x86.avx2.pshuf.b", ir.VectorType(ir.IntType(8), 32), 2
    fn = _declared(builder, name, vt, [vt, vt])
    if parts == 1:
        return builder.call(fn, [ir.Constant(_V64I8, table), codes])
    n = 64 // parts
    out = []
    for p in range(parts):
        idx = ir.Constant(ir.VectorType(_I32, n), list(range(p * n, p * n + n)))
        out.append(builder.call(fn, [ir.Constant(vt, table[:n]), builder.shuffle_vector(codes, codes, idx)]))
    return builder.shuffle_vector(out[0], out[1], ir.Constant(ir.VectorType(_I32, 64), list(range(64))))


_V32I16 = ir.VectorType(_I16, 32)


def _splat32(builder, value):
    """An int32 repeated 16 times (16 x i32)."""
    vec = builder.insert_element(ir.Constant(_V16I32, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_V16I32, ir.Undefined), ir.Constant(_V16I32, [0] * 16))


def _nibble_dots(builder, accs, q, planes, j, bits, pairs):
    """accs (16 x i32 each, row r in lane r; two for Q6_K, its halves) + 16 rows' dots of group j of a
    nibble layout: q (64 x i8: row r's bytes at 4r..4r+3, byte i holding weights 4j+i low and
    16+4j+i high) and, for 5- and 6-bit weights, the planes of their high `bits` (_dot_block_codegen),
    with the activations of those weights: pairs[h][k] (h = 0 low, 1 high) the int32 holding the
    int16 activations of weights (0, 2) (k = 0) or (1, 3) (k = 1) of the four, as dot_setup lays
    them out (pair_words). The bytes are read as 16-bit words, word 2r + k holding bytes 2k, 2k+1 of
    row r, so each weight is shifts and masks away from a 16-bit lane, and the multiply-add of
    neighbouring pairs meets the activations of weights (0, 2) or (1, 3): no byte widening (AVX2's
    vpmovzxbw and lane extracts, cross-lane) before vpmaddwd / vpdpwssd, and each pair is broadcast
    as it is loaded (vpbroadcastd), not shuffled out of a word (vpshuflw + vpbroadcastd). Integer
    sums: the dots of the byte-wise widening, to the bit. (Q8_0's bytes the same way, a shift pair
    each, measured no faster on AVX2: they keep it.)"""
    w = builder.bitcast(q, _V32I16)
    plane_words = [builder.bitcast(p, _V32I16) for p in planes]
    six = bits == 2  # Q6_K: q - 32, signed, and a sum per half

    def splat(n):
        return ir.Constant(_V32I16, [n] * 32)

    for h in range(2):  # low nibbles (weights 4j + i), high nibbles (16 + 4j + i)
        for k in range(2):  # bytes 0 and 2 of each row's 4 (the words' low bytes), bytes 1 and 3
            shift = 4 * h + 8 * k
            v = builder.lshr(w, splat(shift)) if shift else w
            if shift != 12:
                v = builder.and_(v, splat(15))
            if bits:
                pos = (2 * j + h) * bits
                high = builder.and_(builder.lshr(plane_words[pos // 8], splat(pos % 8 + 8 * k)), splat((1 << bits) - 1))
                v = builder.or_(v, builder.shl(high, splat(4)))
                if six:
                    v = builder.sub(v, splat(32))
            x = builder.bitcast(_splat32(builder, pairs[h][k]), _V32I16)
            a = h if six else 0
            accs[a] = _multiply_add_words(builder, accs[a], v, x)
    return accs


def _multiply_add_words(builder, acc, w, x, plain=False):
    """acc (16 x i32) + the sums of neighbouring pairs of w * x (32 x i16 each, the products in int32).
    Where the CPU has AVX-512 BW, the plain IR of _multiply_add_pairs (LLVM forms vpdpwssd from it
    with VNNI). Else AVX2's vpmaddwd by name, on 16-bit halves: from the plain IR LLVM widened the
    loop-invariant activations of a one-token kernel to 32 bits outside its loop and narrowed them
    back before each vpmaddwd (vpmovsxwd, vpackssdw, vpermq: 3 instructions a pair, seen in the
    assembly). The same integer sums either way. `plain`: the plain IR on every CPU."""
    if plain or "avx512bw" in (target_features() or set()):
        wide = ir.VectorType(_I32, 32)
        return _multiply_add_pairs(builder, acc, builder.sext(w, wide), builder.sext(x, wide))
    v16 = ir.VectorType(_I16, 16)
    fn = _declared(builder, _PMADDWD, ir.VectorType(_I32, 8), [v16, v16])
    halves = []
    for lo in (0, 16):
        pick = ir.Constant(ir.VectorType(_I32, 16), list(range(lo, lo + 16)))
        halves.append(builder.call(fn, [builder.shuffle_vector(w, w, pick), builder.shuffle_vector(x, x, pick)]))
    return builder.add(acc, builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I32, list(range(16)))))


def _dot_block_codegen(quads, tokens, int8=False):
    """Arguments: dots, one dots offset per token, qs, w_at, w_stride, xs, one xs offset per token.
    Group j's 64 weight bytes (16 rows x 4) are at qs[w_at + j * w_stride]; token t's activation words
    for it at xs[x_t + j] (and, nibbles, the high nibbles' at xs[x_t + NIBBLE_QUADS + j]). Token t's 16
    rows' dots (int32) are stored at dots[at_t:at_t + 16].

    Planes (packing.py): byte i of a row's plane word holds, for nibble half h of group j (k = 2j + h),
    the high bit(s) of weight 16h + 4j + i at bits k*b..k*b+b-1 of the plane's bytes (b = 1 or 2 bits;
    Q6_K's two planes hold k = 0-3 and 4-7). Q6_K's weights are q - 32 (signed) and its two nibble
    halves have their own scales: the high half's dots go to dots[at_t + w_stride // 4:] (w_stride // 4
    = the rows of the matrix's groups: a token's dots of one half).

    `int8`: xs holds int32 words of 4 int8 activations (else int64 words of 4 int16) and the products
    are vpdpbusd's, unsigned weights times signed activations: nibbles and 5-bit weights are unsigned
    already; a Q8_0 weight w enters as w + 128, and the fold takes 128 * sum(x) off (packed.fold_dots;
    flipping signs instead was 2x slower). Q6_K keeps int16.

    Kinds from 16 up (int16 only): crumbs (Q2_K, Q3_K) read 4 weights a byte, group j's bits 2c, 2c+1
    holding word j + 2c (weights 4(j + 2c)..+3), words 0-3 and 4-7 the two halves (their dots stored
    as Q6_K's); Q3_K's plane holds weight 4w + i's third bit at bit w of byte i, and its weights are q - 4.
    Levels (IQ4) read the nibble layout and look each code up in IQ4_LEVELS."""
    assert not (int8 and quads in (SIX_QUADS, CRUMB_KIND, CRUMB3_KIND, LEVEL_KIND))
    levels = quads == LEVEL_KIND
    crumbs = quads in (CRUMB_KIND, CRUMB3_KIND)  # group j, crumb c (bits 2c, 2c+1 of a byte): word j + 2c
    quads %= 16
    nibbles = quads != BYTE_QUADS and not crumbs
    bits = {FIVE_QUADS: 1, SIX_QUADS: 2}.get(quads, 0)
    halves = quads == SIX_QUADS or crumbs
    n_nib = NIBBLE_QUADS if nibbles else (2 if crumbs else BYTE_QUADS)

    def vec(v):
        return ir.Constant(_V64I8, [v] * 64)

    def codegen(context, builder, signature, args):
        sig = signature.args
        index = [context.cast(builder, v, t, types.intp) if isinstance(t, types.Integer) else v
                 for v, t in zip(args, sig)]
        dots_t, qs_t, xs_t = sig[0], sig[1 + tokens], sig[4 + tokens]
        dots_at, x_at = index[1:1 + tokens], index[5 + tokens:5 + 2 * tokens]
        qs, w_at, w_stride, xs = args[1 + tokens], index[2 + tokens], index[3 + tokens], args[4 + tokens]

        def load_group(j):
            at_j = builder.add(w_at, builder.mul(w_stride, ir.Constant(_I64, j)))
            ptr = builder.bitcast(_element_ptr(context, builder, qs_t, qs, at_j), _V64I8.as_pointer())
            return builder.load(ptr, align=1)

        planes = [load_group(n_nib + p) for p in range(quads - n_nib if crumbs else bits)]
        zero = ir.Constant(_V16I32, [0] * 16)
        if nibbles and not (levels or int8):  # Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K: see _nibble_dots
            rows = [[zero] * (2 if halves else 1) for _ in range(tokens)]
            for j in range(n_nib):
                q = load_group(j)
                for t in range(tokens):
                    words = [builder.bitcast(_element_ptr(context, builder, xs_t, xs, builder.add(
                        x_at[t], ir.Constant(_I64, j + h * NIBBLE_QUADS))), _I32.as_pointer()) for h in range(2)]
                    pairs = [[builder.load(builder.gep(w, [ir.Constant(_I32, k)]), align=4) for k in range(2)]
                             for w in words]
                    rows[t] = _nibble_dots(builder, rows[t], q, planes, j, bits, pairs)
            for t in range(tokens):
                for i, a in enumerate(rows[t]):  # Q6_K's second half: w_stride // 4 on (see above)
                    at = builder.add(dots_at[t], builder.lshr(w_stride, ir.Constant(_I64, 2))) if i else dots_at[t]
                    ptr = builder.bitcast(_element_ptr(context, builder, dots_t, args[0], at), _V16I32.as_pointer())
                    builder.store(a, ptr, align=4)
            return context.get_dummy_value()
        acc = [[[zero, zero] for _ in range(2 if halves else 1)] for _ in range(tokens)]
        # int8 without VNNI (_byte_pairs): pair sums added in int16, at most short_max of them (4-bit
        # weights: 8 * 15 * 127 * 2 = 30480, 5-bit: 4 * 31 * 127 * 2), before widening to int32
        byte_pairs = int8 and not has_int8_bytes()
        short, short_max = [[None, 0] for _ in range(tokens)], 4 if bits else 8
        for j in range(n_nib):
            q = load_group(j)
            if crumbs:
                values = [builder.and_(builder.lshr(q, vec(2 * c)), vec(3)) for c in range(4)]
                for c in range(4 if planes else 0):  # Q3_K: the third bit from bit j + 2c of the plane; q - 4
                    high = builder.and_(builder.lshr(planes[0], vec(j + 2 * c)), vec(1))
                    values[c] = builder.sub(builder.or_(values[c], builder.shl(high, vec(2))), vec(4))
            elif nibbles:
                values = [builder.and_(q, vec(15)), builder.lshr(q, vec(4))]
                if levels:
                    values = [_level_lookup(builder, v) for v in values]
            else:
                values = [q]
            if bits:  # here only the int8 kernels' 5-bit weights (the int16 ones: _nibble_dots)
                for h in range(2):
                    pos = (2 * j + h) * bits
                    high = builder.and_(builder.lshr(planes[pos // 8], vec(pos % 8)), vec((1 << bits) - 1))
                    values[h] = builder.or_(values[h], builder.shl(high, vec(4)))
            if int8:
                for t in range(tokens):
                    for i, v in enumerate(values):
                        word_at = builder.add(x_at[t], ir.Constant(_I64, j + i * NIBBLE_QUADS))
                        xv = _broadcast_bytes(builder, builder.load(
                            _element_ptr(context, builder, xs_t, xs, word_at), align=4))
                        if not nibbles:  # signed weights w as w + 128: the fold subtracts 128 * sum(x)
                            v = builder.xor(v, vec(128))
                        if not byte_pairs:
                            acc[t][0][0] = _dpbusd(builder, acc[t][0][0], v, xv)
                            continue
                        pairs = _byte_pairs(builder, v, xv)
                        if short[t][0] is not None:
                            pairs = [builder.add(a, b) for a, b in zip(short[t][0], pairs)]
                        short[t] = [pairs, short[t][1] + 1]
                        if short[t][1] == short_max:
                            acc[t][0][0] = builder.add(acc[t][0][0], _widen_pairs(builder, pairs))
                            short[t] = [None, 0]
                continue
            widen = builder.sext if (halves or not nibbles or levels) else builder.zext
            # Q2_K keeps the plain IR on AVX2 too: its 8-token kernel was 0.89x with vpmaddwd by name
            q2k = crumbs and quads == CRUMB_KIND % 16
            wide = [[widen(builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 32), list(range(lo, lo + 32)))),
                           _V32I16) for lo in (0, 32)]  # rows 0-7, rows 8-15 of the 16
                    for v in values]
            for t in range(tokens):
                for i, pair in enumerate(wide):
                    word_at = builder.add(x_at[t], ir.Constant(_I64, j + 2 * i if crumbs else j + i * NIBBLE_QUADS))
                    word = builder.load(_element_ptr(context, builder, xs_t, xs, word_at), align=8)
                    xv = _broadcast_words(builder, word)
                    a = acc[t][(i // 2 if crumbs else i) if halves else 0]
                    for h in range(2):
                        a[h] = _multiply_add_words(builder, a[h], pair[h], xv, plain=q2k)
        for t in range(tokens):
            if int8 and short[t][0] is not None:
                acc[t][0][0] = builder.add(acc[t][0][0], _widen_pairs(builder, short[t][0]))
            if int8:  # one int32 a row already
                ptr = builder.bitcast(_element_ptr(context, builder, dots_t, args[0], dots_at[t]), _V16I32.as_pointer())
                builder.store(acc[t][0][0], ptr, align=4)
                continue
            for i, a in enumerate(acc[t]):
                at = dots_at[t]
                if i:
                    at = builder.add(at, builder.lshr(w_stride, ir.Constant(_I64, 2)))
                ptr = builder.bitcast(_element_ptr(context, builder, dots_t, args[0], at), _V16I32.as_pointer())
                builder.store(_row_sums(builder, a), ptr, align=4)
        return context.get_dummy_value()
    return codegen


DOT_KINDS = (NIBBLE_QUADS, FIVE_QUADS, SIX_QUADS, BYTE_QUADS, CRUMB_KIND, CRUMB3_KIND, LEVEL_KIND)
DOT8_KINDS = (NIBBLE_QUADS, FIVE_QUADS, BYTE_QUADS)  # with int8 activations (VNNI; AVX2: int8_kinds): Q6_K has none


def _dot_block_typer(tokens):
    """The typer of dot_block{tokens}: `kind` and `int8` must be compile-time constants (a kernel
    passes module constants and literals), and only that kind's code is generated. One call
    branching over every kind at run time generated all eleven kinds' vector code into each kernel,
    a longer compile on a first start (benchmarks/README.md, "First start")."""
    def typer(kind, int8, args):
        if not isinstance(kind, types.IntegerLiteral) or not isinstance(int8, types.BooleanLiteral):
            return None  # numba tries again with the literal types
        quads, i8 = kind.literal_value, int8.literal_value
        if quads not in (int8_kinds() if i8 else DOT_KINDS):
            raise TypeError(f"dot_block{tokens}: no {'int8 ' if i8 else ''}kernel for kind {quads}")
        inner = _dot_block_codegen(quads, tokens, i8)

        def codegen(context, builder, signature, call_args):  # the kind and int8 arguments chose `inner`
            return inner(context, builder, signature.replace(args=signature.args[2:]), call_args[2:])
        return types.void(kind, int8, *args), codegen
    return typer


_typer1, _typer2, _typer4 = _dot_block_typer(1), _dot_block_typer(2), _dot_block_typer(4)


# A sub-block's dots (see _dot_block_codegen) for 1, 2 and 4 tokens of one kind of weights (numba's
# @intrinsic wants the arguments spelled out). The 2- and 4-token ones unpack each weight group once
# for all their tokens. `int8`: with int8 activations.
@intrinsic(prefer_literal=True)
def dot_block1(typingctx, kind, int8, dots, at_a, qs, w_at, w_stride, xs, x_a):
    return _typer1(kind, int8, (dots, at_a, qs, w_at, w_stride, xs, x_a))


@intrinsic(prefer_literal=True)
def dot_block2(typingctx, kind, int8, dots, at_a, at_b, qs, w_at, w_stride, xs, x_a, x_b):
    return _typer2(kind, int8, (dots, at_a, at_b, qs, w_at, w_stride, xs, x_a, x_b))


@intrinsic(prefer_literal=True)
def dot_block4(typingctx, kind, int8, dots, at_a, at_b, at_c, at_d, qs, w_at, w_stride, xs, x_a, x_b, x_c, x_d):
    return _typer4(kind, int8, (dots, at_a, at_b, at_c, at_d, qs, w_at, w_stride, xs, x_a, x_b, x_c, x_d))


# -- 16-lane float steps of the dot kernels' fold (packed.fold_dots). Written as vector IR because
# LLVM's loop vectorizer wants 64+ iterations (16 lanes x 4 interleaved) before it leaves the scalar
# loop: over 16 rows it ran scalar (seen in the assembly; the fold then took half the int8 kernels' time).

_V16F = ir.VectorType(ir.FloatType(), 16)


def _vector_at(context, builder, array_type, array, index, vector_type):
    return builder.bitcast(_element_ptr(context, builder, array_type, array, index), vector_type.as_pointer())


def _fma(builder, a, b, c):
    """a * b + c rounded once, always: left to LLVM, whether a multiply and an add fuse can differ
    between kernels, and a token's bits would then depend on the kernel its batch took."""
    fn = _declared(builder, f"llvm.fma.v{a.type.count}f32", a.type, [a.type] * 3)
    return builder.call(fn, [a, b, c])


def _splat(builder, value, lanes=16):
    vt = ir.VectorType(ir.FloatType(), lanes)
    vec = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    return builder.shuffle_vector(vec, ir.Constant(vt, ir.Undefined), zeros)


@intrinsic
def tile4x32(typingctx, c, c_at, c_stride, a, a_at, a_stride, b, b_at, b_stride):
    """C[r, 0:32] += sum over s < 16 of A[r, s] * B[s, 0:32], for r < 4: a 4 x 32 block of a float32
    matrix product, 16 steps of the inner dimension (flat C arrays: row r of C at c_at + r * c_stride,
    of A at a_at + r * a_stride, row s of B at b_at + s * b_stride). The 8 sums stay in registers over
    the 16 steps; each step loads 2 vectors of B and broadcasts 4 values of A (prompt attention)."""
    sig = types.void(c, c_at, c_stride, a, a_at, a_stride, b, b_at, b_stride)

    def codegen(context, builder, signature, args):
        t = signature.args
        i = [context.cast(builder, v, ty, types.intp) if isinstance(ty, types.Integer) else v for v, ty in zip(args, t)]
        c_at, c_stride, a_at, a_stride, b_at, b_stride = i[1], i[2], i[4], i[5], i[7], i[8]

        def at(base, row, stride, col):
            return builder.add(builder.add(base, builder.mul(ir.Constant(_I64, row), stride)), ir.Constant(_I64, col))

        def vector(k, index):
            return _vector_at(context, builder, t[k], args[k], index, _V16F)

        acc = [[builder.load(vector(0, at(c_at, r, c_stride, 16 * h)), align=4) for h in range(2)] for r in range(4)]
        for step in range(16):
            row = [builder.load(vector(6, at(b_at, step, b_stride, 16 * h)), align=4) for h in range(2)]
            for r in range(4):
                x = builder.load(_element_ptr(context, builder, t[3], args[3], at(a_at, r, a_stride, step)), align=4)
                xs = _splat(builder, x)
                acc[r] = [_fma(builder, xs, row[h], acc[r][h]) for h in range(2)]
        for r in range(4):
            for h in range(2):
                builder.store(acc[r][h], vector(0, at(c_at, r, c_stride, 16 * h)), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def add_scaled_dots16(typingctx, acc, acc_at, scale, scale_at, dots, dots_at, s):
    """acc.flat[acc_at + i] += scale.flat[scale_at + i] * (s * float(dots.flat[dots_at + i])), i < 16
    (float32 acc and scale, int32 dots, C arrays)."""
    sig = types.void(acc, acc_at, scale, scale_at, dots, dots_at, s)

    def codegen(context, builder, signature, args):
        t = signature.args
        idx = [context.cast(builder, a, ty, types.intp) if isinstance(ty, types.Integer) else a for a, ty in zip(args, t)]
        pa = _vector_at(context, builder, t[0], args[0], idx[1], _V16F)
        sc = builder.load(_vector_at(context, builder, t[2], args[2], idx[3], _V16F), align=4)
        dv = builder.load(_vector_at(context, builder, t[4], args[4], idx[5], _V16I32), align=4)
        sd = builder.fmul(_splat(builder, args[6]), builder.sitofp(dv, _V16F))
        builder.store(_fma(builder, sc, sd, builder.load(pa, align=4)), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def add_scaled16(typingctx, acc, acc_at, scale, scale_at, c):
    """acc.flat[acc_at + i] += scale.flat[scale_at + i] * c, i < 16 (float32 C arrays)."""
    sig = types.void(acc, acc_at, scale, scale_at, c)

    def codegen(context, builder, signature, args):
        t = signature.args
        idx = [context.cast(builder, a, ty, types.intp) if isinstance(ty, types.Integer) else a for a, ty in zip(args, t)]
        pa = _vector_at(context, builder, t[0], args[0], idx[1], _V16F)
        sc = builder.load(_vector_at(context, builder, t[2], args[2], idx[3], _V16F), align=4)
        builder.store(_fma(builder, sc, _splat(builder, args[4]), builder.load(pa, align=4)), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


# -- decode attention over cache rows, 16 rows at a time (ops.paged_item). The rows of one KV head are
# apart in the pools (row-major: position, head, value), so a dot product per row would end in a
# horizontal sum of its own; here the rows' products stay lane-wise over the head's values and one
# tree of shuffles sums them all at the end. The stores are float32, f16 bits (uint16) or q8_0 bytes
# (int8: blocks of an f16 scale and 32 int8, whose products q * d are exact in float32).
#
# With AVX-512, 16 rows' sums of 16 lanes each fill 16 of its 32 registers. AVX2 has 16 registers of
# 8 floats: there the 16 rows go as two groups of 8 rows of 8 lanes, so the sums and the rows' addresses
# stay in registers (16 lanes there spilled about half of them to the stack at every step).


def _attention_lanes() -> int:
    """Lanes of the decode-attention kernels' vectors: 16 with AVX-512 (or an unknown CPU), else 8."""
    features = target_features()
    return 16 if features is None or "avx512f" in features else 8


def _row_chunk(context, builder, store_type, store, base, c, lanes=16):
    """Values lanes*c .. lanes*c + lanes-1 of the cache row whose first element is store.flat[base],
    as floats."""
    dtype = store_type.dtype
    vf = ir.VectorType(ir.FloatType(), lanes)
    if dtype in (types.float32, types.uint16):
        at = builder.add(base, builder.mul(c, ir.Constant(_I64, lanes)))
        if dtype == types.float32:
            return builder.load(_vector_at(context, builder, store_type, store, at, vf), align=4)
        bits = builder.load(_vector_at(context, builder, store_type, store, at, ir.VectorType(_I16, lanes)), align=2)
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), vf)
    # q8_0: chunk c is part c % per_block of block c // per_block
    per_block = 32 // lanes
    shift = per_block.bit_length() - 1
    block = builder.add(base, builder.mul(builder.lshr(c, ir.Constant(_I64, shift)), ir.Constant(_I64, 34)))
    scale_ptr = builder.bitcast(_element_ptr(context, builder, store_type, store, block), ir.HalfType().as_pointer())
    scale = builder.fpext(builder.load(scale_ptr, align=1), ir.FloatType())
    at = builder.add(builder.add(block, ir.Constant(_I64, 2)),
                     builder.mul(builder.and_(c, ir.Constant(_I64, per_block - 1)), ir.Constant(_I64, lanes)))
    q = builder.load(_vector_at(context, builder, store_type, store, at, ir.VectorType(ir.IntType(8), lanes)), align=1)
    return builder.fmul(builder.sitofp(q, vf), _splat(builder, scale, lanes))


def _lane_sums(builder, vectors):
    """n vectors of n lanes -> one whose lane r is the sum of vectors[r]'s lanes: log2(n) levels of
    pairwise shuffles and adds (n - 1 of each pair), a fixed order."""
    n = len(vectors)
    h = n // 2
    while h:  # lanes of each pair (a, b) of vectors: 2n lanes, a's then b's
        lo = ir.Constant(ir.VectorType(_I32, n), [i for i in range(2 * n) if i % (2 * h) < h])
        hi = ir.Constant(ir.VectorType(_I32, n), [i + h for i in range(2 * n) if i % (2 * h) < h])
        vectors = [builder.fadd(builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        h //= 2
    return vectors[0]


def _row_bases(context, builder, bases_type, bases, b_at, offset, rows=16):
    """bases.flat[b_at + r] + offset for r < rows (int64 element offsets of cache rows)."""
    ptr = _vector_at(context, builder, bases_type, bases, b_at, ir.VectorType(_I64, rows))
    vec = builder.load(ptr, align=8)
    return [builder.add(builder.extract_element(vec, ir.Constant(_I32, r)), offset) for r in range(rows)]


def _key_dots16(typingctx, out, out_at, q, q_at, store, bases, b_at, offset, n_chunks):
    """out.flat[out_at + r] = sum over i < 16 * n_chunks of q.flat[q_at + i] * value i of the cache row
    at store.flat[bases.flat[b_at + r] + offset], for r < 16: 16 keys' scores against one query."""
    sig = types.void(out, out_at, q, q_at, store, bases, b_at, offset, n_chunks)
    lanes = _attention_lanes()

    def codegen(context, builder, signature, args):
        t = signature.args
        i = [context.cast(builder, v, ty, types.intp) if isinstance(ty, types.Integer) else v for v, ty in zip(args, t)]
        vf = ir.VectorType(ir.FloatType(), lanes)
        steps = builder.mul(i[8], ir.Constant(_I64, 16 // lanes))
        for g in range(0, 16, lanes):  # groups of `lanes` rows
            rows = _row_bases(context, builder, t[5], args[5], builder.add(i[6], ir.Constant(_I64, g)), i[7], lanes)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes)) for _ in range(lanes)]
            with cgutils.for_range(builder, steps) as loop:
                c = loop.index
                qv = builder.load(_vector_at(context, builder, t[2], args[2],
                                             builder.add(i[3], builder.mul(c, ir.Constant(_I64, lanes))), vf), align=4)
                for r in range(lanes):
                    v = _row_chunk(context, builder, t[4], args[4], rows[r], c, lanes)
                    builder.store(_fma(builder, v, qv, builder.load(acc[r])), acc[r])
            sums = _lane_sums(builder, [builder.load(a) for a in acc])
            builder.store(sums, _vector_at(context, builder, t[0], args[0], builder.add(i[1], ir.Constant(_I64, g)), vf),
                          align=4)
        return context.get_dummy_value()

    return sig, codegen


def _value_axpy16(typingctx, acc, acc_at, w, w_at, store, bases, b_at, offset, n_chunks):
    """acc.flat[acc_at + i] += sum over r < 16 of w.flat[w_at + r] * value i of the cache row at
    store.flat[bases.flat[b_at + r] + offset], for i < 16 * n_chunks: 16 values' rows weighted into
    one sum (per group of rows, the even and the odd rows in two chains, added last)."""
    sig = types.void(acc, acc_at, w, w_at, store, bases, b_at, offset, n_chunks)
    lanes = _attention_lanes()

    def codegen(context, builder, signature, args):
        t = signature.args
        i = [context.cast(builder, v, ty, types.intp) if isinstance(ty, types.Integer) else v for v, ty in zip(args, t)]
        vf = ir.VectorType(ir.FloatType(), lanes)
        steps = builder.mul(i[8], ir.Constant(_I64, 16 // lanes))
        for g in range(0, 16, lanes):  # groups of `lanes` rows
            rows = _row_bases(context, builder, t[5], args[5], builder.add(i[6], ir.Constant(_I64, g)), i[7], lanes)
            weights = [_splat(builder, builder.load(_element_ptr(context, builder, t[2], args[2],
                                                                 builder.add(i[3], ir.Constant(_I64, g + r))), align=4),
                              lanes) for r in range(lanes)]
            with cgutils.for_range(builder, steps) as loop:
                c = loop.index
                ptr = _vector_at(context, builder, t[0], args[0], builder.add(i[1], builder.mul(c, ir.Constant(_I64, lanes))),
                                 vf)
                sums = [builder.load(ptr, align=4), ir.Constant(vf, [0.0] * lanes)]
                for r in range(lanes):
                    v = _row_chunk(context, builder, t[4], args[4], rows[r], c, lanes)
                    sums[r % 2] = _fma(builder, weights[r], v, sums[r % 2])
                builder.store(builder.fadd(sums[0], sums[1]), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


# (the typers above stay plain functions: a test makes fresh intrinsics of them at both widths, since
# numba keeps an intrinsic's code per argument types once it has made it)
key_dots16 = intrinsic(_key_dots16)
value_axpy16 = intrinsic(_value_axpy16)
