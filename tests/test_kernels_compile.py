"""Every Triton kernel compiles for sm_90 (H100/H200) as its launcher calls it, without a GPU.

The other kernel tests run in the interpreter, which never compiles. ``tests/sm90_compile.py``
runs each module's public functions (forward and backward) at BEiT-Base sizes with the kernels
swapped for recorders (gathered CE and masked embed: bf16, fp16, fp32, fp32 weights under autocast,
with and without bias / pos_embed; block masks: every mode; attention: bf16 and fp32), then
compiles each recorded launch with the dtypes, constexprs and argument specialization the GPU would
use (every config of an autotuned kernel), and fails on a compile error or a kernel needing more
shared memory than sm_90 has. Each compiled kernel's shared memory, registers and spills are
printed (``pytest -s`` shows them).
"""

import pytest
from sm90_compile import run_in_subprocess

from fastbeit.kernels import interpreting

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not interpreting(), reason="a CPU-only check (on a GPU the kernel tests compile these)"),
]


@pytest.mark.parametrize("group", ["gathered_ce", "masked_embed", "block_mask", "token_argmax", "attention_all"])
def test_kernels_compile_for_sm90(group, tmp_path):
    """~5-20 s per group on a CPU (Triton's ptxas, a fresh cache)."""
    compiled = run_in_subprocess(tmp_path, group)
    print("\n".join(compiled))
    assert compiled
