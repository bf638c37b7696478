"""The GPU-session scripts stay runnable: a GPU session gets one call, so a script broken by a
change elsewhere would waste it. The kernel check runs its small cases through the interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_logic_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    rows = gpu_check.run_all(quick=True)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["check"] for r in rows} == {"attention", "gathered CE", "masked embed", "block masks"}


def test_gpu_check_without_cuda_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("CUDA present: the real check runs in benchmarks/gpu_run.sh")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_gpu_run_script_parses_and_skips_what_is_not_asked(tmp_path):
    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "STAGES": "none", "PY": sys.executable}
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    status = (tmp_path / "out" / "status.txt").read_text()
    assert "check skipped (not in STAGES)" in status and "reproduce skipped" in status
    assert (tmp_path / "out" / "results.tgz").stat().st_size > 0
