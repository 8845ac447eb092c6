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
# multiply, add neighbouring pairs): LLVM selects vpmaddwd + vpaddd on x86 with AVX2 or AVX-512 (seen
# in the kernels' assembly; in a small loop it also fuses them into AVX512-VNNI's vpdpwssd).

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I32 = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(ir.IntType(8), 64)
_EVEN = ir.Constant(ir.VectorType(_I32, 16), list(range(0, 32, 2)))
_ODD = ir.Constant(ir.VectorType(_I32, 16), list(range(1, 32, 2)))


def _broadcast_words(builder, value):
    """An int64 holding 4 int16 -> those 4 repeated 8 times, as <32 x i32> (each int16 widened)."""
    v8 = ir.VectorType(_I64, 8)
    vec = builder.insert_element(ir.Constant(v8, ir.Undefined), value, ir.Constant(_I32, 0))
    vec = builder.shuffle_vector(vec, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return builder.sext(builder.bitcast(vec, ir.VectorType(_I16, 32)), ir.VectorType(_I32, 32))


def _multiply_add_pairs(builder, acc, w, x):
    """acc (16 x i32) + the sums of neighbouring pairs of w * x (32 x i32 each): vpmaddwd + vpaddd."""
    p = builder.mul(w, x)
    pairs = builder.add(builder.shuffle_vector(p, p, _EVEN), builder.shuffle_vector(p, p, _ODD))
    return builder.add(acc, pairs)


def _dot16_codegen(nibbles, tokens=1):
    """Load and widen the 64 weight bytes once, then multiply-add them into each token's accumulators.
    Arguments: acc, one acc offset per token, qs, qs_at, then per token x_lo, x_hi (nibbles) or x4."""
    def codegen(context, builder, signature, args):
        qs_type, qs, qs_at = signature.args[1 + tokens], args[1 + tokens], args[2 + tokens]
        xs = args[3 + tokens:]
        q = builder.load(builder.bitcast(_element_ptr(context, builder, qs_type, qs, qs_at),
                                         _V64I8.as_pointer()), align=1)
        if nibbles:
            values = [builder.and_(q, ir.Constant(_V64I8, [15] * 64)), builder.lshr(q, ir.Constant(_V64I8, [4] * 64))]
        else:
            values = [q]
        widen = builder.zext if nibbles else builder.sext
        wide = [[widen(builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 32), list(range(lo, lo + 32)))),
                       ir.VectorType(_I32, 32)) for lo in (0, 32)]  # rows 0-7, rows 8-15 of the 16
                for v in values]
        for t in range(tokens):
            acc_ptr = builder.bitcast(_element_ptr(context, builder, signature.args[0], args[0], args[1 + t]),
                                      _V16I32.as_pointer())
            acc_ptrs = (acc_ptr, builder.gep(acc_ptr, [ir.Constant(_I32, 1)]))
            acc = [builder.load(p, align=4) for p in acc_ptrs]
            for i, halves in enumerate(wide):
                xv = _broadcast_words(builder, xs[t * len(wide) + i])
                for h in range(2):
                    acc[h] = _multiply_add_pairs(builder, acc[h], halves[h], xv)
            for p, a in zip(acc_ptrs, acc):
                builder.store(a, p, align=4)
        return context.get_dummy_value()
    return codegen


@intrinsic
def dot16_nibbles(typingctx, acc, acc_at, qs, qs_at, x_lo, x_hi):
    """16 rows' integer dot products over 8 weights each. The 64 bytes at qs[qs_at] hold 4 bytes per
    row (low nibbles: 4 weights, high nibbles: 4 more); x_lo and x_hi (int64) hold the 4 int16
    activations each multiplies. acc[acc_at:acc_at + 32] (int32, two per row: the row's dot is their
    sum) accumulates them."""
    return types.void(acc, acc_at, qs, qs_at, x_lo, x_hi), _dot16_codegen(nibbles=True)


@intrinsic
def dot16_nibbles2(typingctx, acc, at_a, at_b, qs, qs_at, xa_lo, xa_hi, xb_lo, xb_hi):
    """dot16_nibbles for two tokens (a into acc[at_a:], b into acc[at_b:]), the weights unpacked once.
    Integer sums: each token's are the same as dot16_nibbles gives it alone."""
    return types.void(acc, at_a, at_b, qs, qs_at, xa_lo, xa_hi, xb_lo, xb_hi), _dot16_codegen(True, 2)


@intrinsic
def dot16_nibbles4(typingctx, acc, at_a, at_b, at_c, at_d, qs, qs_at, xa_lo, xa_hi, xb_lo, xb_hi, xc_lo, xc_hi,
                   xd_lo, xd_hi):
    """dot16_nibbles for four tokens, the weights unpacked once."""
    return (types.void(acc, at_a, at_b, at_c, at_d, qs, qs_at, xa_lo, xa_hi, xb_lo, xb_hi, xc_lo, xc_hi, xd_lo, xd_hi),
            _dot16_codegen(True, 4))


@intrinsic
def dot16_bytes(typingctx, acc, acc_at, qs, qs_at, x4):
    """As dot16_nibbles for 4 int8 weights per row (the 64 bytes at qs[qs_at]) and 4 int16 in x4."""
    return types.void(acc, acc_at, qs, qs_at, x4), _dot16_codegen(nibbles=False)


@intrinsic
def dot16_bytes2(typingctx, acc, at_a, at_b, qs, qs_at, xa, xb):
    """dot16_bytes for two tokens, the weights loaded once."""
    return types.void(acc, at_a, at_b, qs, qs_at, xa, xb), _dot16_codegen(False, 2)


@intrinsic
def dot16_bytes4(typingctx, acc, at_a, at_b, at_c, at_d, qs, qs_at, xa, xb, xc, xd):
    """dot16_bytes for four tokens, the weights loaded once."""
    return types.void(acc, at_a, at_b, at_c, at_d, qs, qs_at, xa, xb, xc, xd), _dot16_codegen(False, 4)


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


def has_int16_dot() -> bool:
    """Whether the int16 dot kernels beat the float32 ones on the target CPU: x86 with AVX2. Measured
    on this project's machine (AVX-512 with VNNI) compiling for it (1.3-1.7x the float32 kernels'
    speed), for skylake-avx512 without VNNI (0.9-1.4x) and for haswell (1.1-1.2x). Other CPUs keep
    the float32 kernels."""
    features = target_features() or set()
    return "avx2" in features
