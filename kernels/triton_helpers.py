"""Small Triton device functions shared by several kernels (needs ``triton``)."""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """float32 -> nearest-even bf16 value, still float32 (the interpreter truncates on casts)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even on the GPU and in the interpreter alike."""
    if DTYPE == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(DTYPE)
