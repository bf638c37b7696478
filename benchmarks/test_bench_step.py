"""The whole pre-training step per contender: fastbeit vs the reference code vs timm (+ compile).

Each round runs ``BENCH_STEP_STEPS`` steps (tokenizer encode, forward, loss, backward, clip,
AdamW) and waits for the device. On a CPU only the tiny case runs (so CI exercises the harness;
its figures mean nothing for GPU speed); with CUDA, BEiT-Base at B=128 and B=256 in bf16 with
DALL-E's tokenizer width. ``extra_info`` holds img/s and peak memory for ``python -m
fastbeit.report --from-json``.

    pytest benchmarks/test_bench_step.py --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-json bench.json && python -m fastbeit.report --from-json bench.json
"""

import gc
import os

import pytest
import torch

from fastbeit import bench_step as bs
from fastbeit.flops import measure_matmul_tflops

CUDA = torch.cuda.is_available()
STEPS = int(os.environ.get("BENCH_STEP_STEPS", "3" if CUDA else "1"))
ROUNDS = int(os.environ.get("BENCH_STEP_ROUNDS", "4" if CUDA else "2"))
CPU_COMPILE = os.environ.get("BENCH_STEP_CPU_COMPILE", "0") == "1"

CASES = {
    "cpu-tiny": dict(model_name="beit_tiny", depth=2, batch=4, img_size=32, patch_size=4, amp="none", vocab_size=256),
    "base-b128": dict(model_name="beit_base", batch=128, img_size=224, patch_size=16, amp="bf16", vocab_size=8192),
    "base-b256": dict(model_name="beit_base", batch=256, img_size=224, patch_size=16, amp="bf16", vocab_size=8192),
}


def _skip_reason(case: str, contender: str):
    if case == "cpu-tiny" and CUDA:
        return "the tiny case is the CPU stand-in; CUDA runs BEiT-Base"
    if case != "cpu-tiny" and not CUDA:
        return "BEiT-Base step benchmarks need CUDA"
    if contender.endswith("-compile") and not CUDA and not CPU_COMPILE:
        return "torch.compile on CPU takes longer than the run (BENCH_STEP_CPU_COMPILE=1 forces it)"
    return None


@pytest.mark.parametrize("contender", bs.CONTENDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, case, contender):
    reason = _skip_reason(case, contender)
    if reason:
        pytest.skip(reason)
    device = torch.device("cuda" if CUDA else "cpu")
    benchmark.group = f"step {case}"
    c = bs.build_contender(contender, device=device, **CASES[case])
    try:
        bs.run_steps(c, 1)  # compile, autotune and optimizer state before the clock
        if CUDA:
            torch.cuda.reset_peak_memory_stats(device)
        loss = benchmark.pedantic(bs.run_steps, args=(c, STEPS), rounds=ROUNDS, iterations=1, warmup_rounds=1)
        assert torch.isfinite(loss)
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update({
            **c.info,
            "steps_per_round": STEPS,
            "img_per_s": round(c.batch * STEPS / mean, 2),
            "step_ms": round(1e3 * mean / STEPS, 3),
            "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)) if CUDA else None,
        })
    finally:
        c.close()
        del c
        gc.collect()


def test_matmul_rate(benchmark):
    """The device's dense matmul rate (bf16 on CUDA, fp32 on CPU): the MFU denominator that
    ``python -m fastbeit.report --from-json`` applies to the step rows of the same JSON."""
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    tflops = benchmark.pedantic(measure_matmul_tflops, args=(device, dtype), rounds=1, iterations=1)
    benchmark.extra_info.update({"matmul_tflops": round(tflops, 3), "dtype": str(dtype).replace("torch.", ""),
                                 "device": bs.device_name(torch.device(device))})
