"""The GPU-session scripts stay runnable: a GPU session gets one call, so a script broken by a
change elsewhere would waste it. The kernel check runs its small cases through the interpreter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402


def test_gpu_check_logic_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    rows = gpu_check.run_all(quick=True)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["check"] for r in rows} == {"attention", "gathered CE", "masked embed", "block masks", "model step",
                                            "token argmax"}
    assert any(r["output"].startswith("dbias max abs") for r in rows)  # the fp32 shared-bias case
    model = [r for r in rows if r["check"] == "model step"]
    assert {r["case"].split(", ")[-1] for r in model} == {"fp32", "bf16 autocast both"}
    assert all("per_tensor" in r for r in model if r["output"].startswith("worst grad"))


def test_grad_errors_judge_each_tensor_by_its_own_size():
    """A tiny gradient off by a tiny amount fails on its own scale; a large one with the same
    absolute error passes; a gradient on one side only is a failure (NaN)."""
    torch = gpu_check.torch
    want = {"big": torch.full((4,), 100.0), "small": torch.full((4,), 1e-4), "only_ref": torch.ones(2)}
    got = {"big": want["big"] + 1e-3, "small": want["small"] + 1e-3}
    errors = gpu_check.grad_errors(got, want)
    assert errors["big"] < 1e-4 and errors["small"] > 1 and errors["only_ref"] != errors["only_ref"]


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


# ------------------------------------------------------------------ gpu_run.sh: order, budget, packing

STAGE_ORDER = ["install", "env", "check", "report", "bench", "json", "ablate", "reproduce"]


def _run_script(tmp_path, timeout=120, **env):
    base = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
            "PY": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_run_plan_puts_value_first_and_fits_the_budget(tmp_path):
    run = _run_script(tmp_path, PLAN_ONLY="1")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("stage ")] == STAGE_ORDER
    fixed, minimum, margin, total, budget = (int(x) for x in re.findall(r"\d+", lines[-1]))
    limits = [int(ln.split()[3]) for ln in lines if ln.startswith("stage ") and "rest" not in ln]
    assert sum(limits) == fixed and fixed + minimum + margin == total <= budget == 570, lines[-1]
    assert margin >= 15 and minimum >= 30


def test_gpu_run_dry_run_keeps_the_budget_and_goes_past_failures(tmp_path):
    """Every stage overruns its limit (sleep 999 s) but report, which fails at once; pytest-benchmark
    is 'missing', so bench is skipped with the reason. At 20 ms per budget second the 570 s run takes
    about 12 s: each stage is cut at its limit, the reproduction gets what is left, the whole run stays
    within TOTAL_S, and the note and archive hold every stage's log."""
    fake = " ".join(f"{s}=999" for s in STAGE_ORDER if s != "report") + " report=5:1"
    left_out = tmp_path / "results" / "reproduce"
    left_out.mkdir(parents=True)
    (left_out / "checkpoint.pt").write_bytes(b"x")
    (left_out / "big.bin").write_bytes(b"\0" * (5 << 20))  # over the 4 MiB a packed file may have
    start = time.monotonic()
    run = _run_script(tmp_path, GPU_RUN_FAKE=fake, GPU_RUN_FAKE_MISSING="pytest_benchmark", TIME_UNIT_MS="20")
    wall = time.monotonic() - start
    assert run.returncode == 0, run.stderr
    status = (tmp_path / "out" / "status.txt").read_text()
    took = {m[0]: int(m[2]) for m in re.findall(r"^(\w+) rc=(\d+) (\d+)s", status, re.M)}
    for name, limit in (("env", 15), ("install", 40), ("check", 150), ("ablate", 45)):
        assert f"{name} rc=124" in status and limit <= took[name] <= limit + 5, status
    assert "report rc=1 " in status and "check failed: reported" in status
    assert "bench skipped (missing Python packages: pytest_benchmark)" in status
    assert "reproduce rc=124" in status and took["reproduce"] >= 100, status  # the rest of the budget
    done = int(re.search(r"done in (\d+)s", status).group(1))
    assert done <= 570, status
    assert wall < 570 * 0.02 + 8
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STAGE_ORDER if s != "bench"} <= names and "summary.md" in names
    assert not {"checkpoint.pt", "big.bin"} & names
    assert "big.bin" in (tmp_path / "results" / "skipped_files.txt").read_text()
    assert "reproduce rc=124" in (tmp_path / "out" / "summary.md").read_text()


def test_gpu_run_packs_after_every_stage_so_a_killed_call_returns_results(tmp_path):
    """The device call killed in the middle of a stage: what finished before is already in $OUT."""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "PY": sys.executable, "GPU_RUN_FAKE": "env=1 install=1 check=9999", "TIME_UNIT_MS": "10"}
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "results" / "check.log").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.log", "install.log", "status.txt", "summary.md"} <= names, names
    assert "install rc=0" in (tmp_path / "out" / "summary.md").read_text()


# ------------------------------------------------------------------------ gpu_summary.py: the note


def test_summary_writes_the_note_from_partial_results(tmp_path):
    res = tmp_path / "results"
    (res / "report").mkdir(parents=True)
    (res / "ablate").mkdir()
    (res / "status.txt").write_text("check rc=1 90s\nreport rc=124 180s (time limit)\n")
    (res / "env.log").write_text("| NVIDIA-SMI 580.1   Driver Version: 580.159.04   CUDA Version: 13.0 |\n"
                                 "device NVIDIA H200\ntriton 3.6.0\n")
    rows = [dict(check="attention", case="B2", output="dq", kind="rel err", value=1e-3, bound=2e-2, ok=True),
            dict(check="model step", case="bf16", output="grad x", kind="per-tensor rel err", value=0.2,
                 bound=5e-2, ok=False)]
    (res / "check.json").write_text(json.dumps({"rows": rows, "stopped": None}))
    step = {"rows": {
        "fastbeit": {"img_per_s": 3000.0, "step_ms": 42.7, "mfu": 0.6, "mfu_peak": 0.486, "compile_s": 12.0},
        "timm-compile": {"img_per_s": 2000.0, "step_ms": 64.0, "compile_s": 50.0},
        "fastbeit-compile": {"contender": "fastbeit-compile", "skipped": "RuntimeError: boom"}},
        "matmul": {"dtype": "bfloat16", "tflops": 800.0}, "flops": {"training": 160.3e9},
        "stopped": "stopped early (signal 15)"}
    (res / "report" / "results.json").write_text(json.dumps(step))
    (res / "ablate" / "results.json").write_text('{"rows": {"base": ')  # torn: the stage was killed writing it
    bench = {"benchmarks": [{"group": "attention fwd+bwd", "name": f"t[{impl}]", "extra_info": {"impl": impl},
                             "stats": {"mean": mean}} for impl, mean in (("eager", 0.004), ("sdpa", 0.003),
                                                                          ("triton", 0.002))]}
    (res / "bench.json").write_text(json.dumps(bench))
    assert gpu_summary.main([str(res), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    for needle in ("NVIDIA H200", "580.159.04", "1/2 rows ok", "grad x", "×1.50", "48.6 %", "60.0 %",
                   "skipped: RuntimeError: boom", "signal 15", "triton 2.000 (×2.00 vs eager, ×1.50 vs sdpa)",
                   "report rc=124"):
        assert needle in text, needle
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["step"]["rows"]["fastbeit"]["vs timm-compile"] == 1.5 and data["ablation"] == {}
