"""LLVM-level helpers numba does not offer: software prefetch, half-precision loads and integer dot
products.

They compile to single instructions (prefetcht0, vcvtph2ps, vpdpwssd) or short runs of them."""
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


# -- integer dot products (AVX512-VNNI's vpdpwssd) for the decode kernels over "dot" layouts
# (packing.py): activations quantized to int16 per 32 weights, 4-byte groups of weights per row.

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I32 = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(ir.IntType(8), 64)


def _dpwssd(builder):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3), "llvm.x86.avx512.vpdpwssd.512")


def _broadcast_words(builder, value):
    """An int64 holding 4 int16 -> those 4 repeated across 512 bits, as <16 x i32>."""
    v8 = ir.VectorType(_I64, 8)
    vec = builder.insert_element(ir.Constant(v8, ir.Undefined), value, ir.Constant(_I32, 0))
    vec = builder.shuffle_vector(vec, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return builder.bitcast(vec, _V16I32)


def _widen_halves(builder, q, signed):
    """<64 x i8> -> two <16 x i32> views of its halves widened to int16 (rows 0-7, rows 8-15)."""
    out = []
    for lo in (0, 32):
        half = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(_I32, 32), list(range(lo, lo + 32))))
        wide = (builder.sext if signed else builder.zext)(half, ir.VectorType(_I16, 32))
        out.append(builder.bitcast(wide, _V16I32))
    return out


def _dot16_codegen(nibbles):
    def codegen(context, builder, signature, args):
        acc_ptr = builder.bitcast(_element_ptr(context, builder, signature.args[0], args[0], args[1]),
                                  _V16I32.as_pointer())
        acc_ptrs = (acc_ptr, builder.gep(acc_ptr, [ir.Constant(_I32, 1)]))
        q = builder.load(builder.bitcast(_element_ptr(context, builder, signature.args[2], args[2], args[3]),
                                         _V64I8.as_pointer()), align=1)
        acc = [builder.load(p, align=4) for p in acc_ptrs]
        if nibbles:
            parts = [(builder.and_(q, ir.Constant(_V64I8, [15] * 64)), args[4]),
                     (builder.lshr(q, ir.Constant(_V64I8, [4] * 64)), args[5])]
        else:
            parts = [(q, args[4])]
        fn = _dpwssd(builder)
        for values, x in parts:
            xv = _broadcast_words(builder, x)
            for i, w in enumerate(_widen_halves(builder, values, signed=not nibbles)):
                acc[i] = builder.call(fn, [acc[i], w, xv])
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
def dot16_bytes(typingctx, acc, acc_at, qs, qs_at, x4):
    """As dot16_nibbles for 4 int8 weights per row (the 64 bytes at qs[qs_at]) and 4 int16 in x4."""
    return types.void(acc, acc_at, qs, qs_at, x4), _dot16_codegen(nibbles=False)


def has_int16_dot() -> bool:
    """Whether numba compiles for a CPU with AVX512-VNNI (vpdpwssd); elsewhere those kernels would
    not compile, and the float kernels are used."""
    try:
        import llvmlite.binding as ll
        from numba.core import config

        if config.CPU_NAME not in (None, "host"):
            return False  # a portable target (NUMBA_CPU_NAME): assume nothing
        features = ll.get_host_cpu_features()
        return bool(features.get("avx512vnni") and features.get("avx512bw"))
    except Exception:  # noqa: BLE001 - unknown: the float kernels always work
        return False
