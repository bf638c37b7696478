"""The GPU-session scripts stay runnable: a GPU session gets one call, so a script broken by a
change elsewhere would waste it. The kernel check runs its small cases through the interpreter."""

from __future__ import annotations

import json
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
    assert {r["check"] for r in rows} == {"attention", "gathered CE", "masked embed", "block masks", "token argmax"}


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


def test_gpu_run_install_fallback_still_imports_the_kernels_under_python_m(tmp_path):
    """Without an installed fastbeit the script puts a copy laid out as installed on PYTHONPATH; the
    ``python -m`` stages, run from the repository root, must import that copy, not ./fastbeit (which
    has no kernels/ inside). Here the editable install is hidden and the json stage runs the report."""
    blocker = tmp_path / "blocker"  # sitecustomize: drop setuptools' editable-install finder
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench.json").write_text('{"benchmarks": []}')
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "RESULTS": str(results), "STAGES": "json",
           "PY": sys.executable, "PYTHONPATH": str(blocker), "T_json": "240"}  # a busy CI machine is slow
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    status = (tmp_path / "out" / "status.txt").read_text()
    assert "install fallback:" in status and "FAILED" not in status, status
    assert "json rc=0 " in status, status + (results / "json.log").read_text()


def test_gpu_check_interrupted_still_reports_the_finished_rows(tmp_path, monkeypatch, capsys):
    """gpu_run.sh stops a stage at its time limit with SIGTERM: the rows checked so far must still be
    printed and written, and the run must not count as passed."""

    def partial(quick=False):
        gpu_check.ROWS.clear()
        gpu_check.record("attention", "case", "out", 1e-5, 1e-4)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "run_all", partial)
    monkeypatch.setattr(gpu_check, "DEVICE", gpu_check.DEVICE)  # restored after main() sets it
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out)]) == 1
    assert "1/1 rows ok" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 1 and data["stopped"]
