"""LLVM-level helpers numba does not offer: software prefetch and half-precision loads.

They compile to single instructions (prefetcht0, vcvtph2ps) and vectorize inside loops."""
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
