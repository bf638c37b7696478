"""Shared set-up for the benchmarks: a ``cuda`` marker that skips without a GPU, and a ``measure``
fixture that times a callable with device syncs and records peak memory in
``benchmark.extra_info`` (a fixture rather than an import: ``tests/`` has a conftest module too).

Run ``pytest benchmarks/ --benchmark-only``. Cases without the marker must stay tiny and run on the
CPU (smoke checks, so CI exercises every benchmark file).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped when none is available")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device() -> torch.device:
    """The current CUDA device, or a skip (for tests that take it as a fixture instead of the marker)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    benchmark: Any,
    fn: Callable[[], Any],
    device: torch.device | str = "cuda",
    rounds: int = 10,
    warmup_rounds: int = 2,
    **extra_info: Any,
) -> Any:
    """Time ``fn()`` (synchronised, so GPU work is counted) and return its last result.

    On CUDA, ``extra_info`` gets ``peak_mem_mb`` (``torch.cuda.max_memory_allocated`` over the
    timed and warm-up calls) and ``peak_extra_mb`` (that peak minus what was allocated before: the
    working memory of ``fn`` itself). Keyword arguments go into ``extra_info`` as they are.
    """
    device = torch.device(device)

    def call():
        out = fn()
        _sync(device)
        return out

    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    result = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        benchmark.extra_info["peak_mem_mb"] = round(peak / 2**20, 1)
        benchmark.extra_info["peak_extra_mb"] = round((peak - base) / 2**20, 1)
    benchmark.extra_info.update(extra_info)
    return result


@pytest.fixture
def measure(benchmark: Any) -> Callable[..., Any]:
    """``measure(fn, device="cuda", rounds=10, warmup_rounds=2, **extra_info)``: see ``_measure``."""
    return functools.partial(_measure, benchmark)
