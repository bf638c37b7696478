"""Test set-up: Triton kernels run in the interpreter on CPU; one intra-op thread keeps CI fast.

The suite's models are tiny: a second OpenMP thread buys nothing there and, on a busy 2-core
machine, made tiny ops tens of times slower (measured while several suites ran at once).
"""

import os

# Must be set before the first @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The CLIs under test size their thread pools from this (fastbeit.cli.leave_cores_for_workers).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# FASTBEIT_SHARED_DATA moves (or, pointed at nothing, hides) it: .ci/run's bare step is a fresh clone's.
SHARED_DATA = pathlib.Path(os.environ.get("FASTBEIT_SHARED_DATA")
                           or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")


def pytest_collection_modifyitems(config, items):
    """Mark every test that reads the real images ``shared_data`` (``-m shared_data`` selects them)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real-image folder beside the checkout, or a clean skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real image data not found at {SHARED_DATA}")
    return SHARED_DATA
