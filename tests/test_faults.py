"""Real faults must not lose work: pre-emption of the whole process group, re-runs, two runs on one
folder, torn logs, full disks, a second Ctrl-C during the save."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupt_on_call
from PIL import Image

from fastbeit import finetune, pretrain, segment
from fastbeit.checkpoint import CheckpointWriteError, atomic_save
from fastbeit.cli import save_after_interrupt, save_checkpoint_or_warn
from fastbeit.data.workers import IgnoreInterrupts
from fastbeit.errors import UserError
from fastbeit.logging_utils import JsonlLogger, read_jsonl
from fastbeit.rundir import LOCK_NAME, claim_output
from fastbeit.tokenizer import train as tokenizer_train

ROOT = Path(__file__).resolve().parents[1]
TORCH_INTERNALS = ("inline_container", "PytorchStreamWriter", "Traceback")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 small images: 20 steps an epoch at batch 2, so a signal lands inside an epoch."""
    root = tmp_path_factory.mktemp("faults") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def pixel_args(data: Path, out: Path, *extra: str) -> list:
    """A tiny pre-training run that needs no tokenizer (pixel targets) nor interpreted Triton kernels."""
    return ["--data", str(data), "--model", "beit_tiny", "--depth", "1", "--input_size", "32", "--patch_size", "4",
            "--second_input_size", "64", "--target", "pixels", "--batch_size", "2", "--epochs", "2",
            "--num_workers", "0", "--num_mask_patches", "20", "--min_mask_patches_per_block", "4",
            "--output", str(out), "--no_progress", "--log_every", "1", "--amp", "none", "--warmup_epochs", "1",
            "--kernels", "reference", "--attn", "sdpa", *extra]


def logged_steps(out: Path) -> list:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl")]


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# --- 1. SIGTERM / SIGINT to the whole process group --------------------------------------------


def test_workers_ignore_interrupts_and_still_run_the_given_init():
    calls, hook = [], sys.excepthook
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        IgnoreInterrupts(calls.append)(3)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in previous)
        sys.excepthook(ConnectionResetError, ConnectionResetError(104, "reset"), None)  # silent
    finally:
        sys.excepthook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert calls == [3]


def test_workers_stay_quiet_only_about_a_connection_the_main_process_dropped():
    """The fd-sharing thread's reports of a dropped connection (reset, end of file, failed
    handshake) are silent; the same error elsewhere, or another error there, is reported."""
    from fastbeit.data.workers import _QuietOnReset

    def traceback_of(exc: BaseException, filename: str):
        namespace = {}
        exec(compile("def serve(exc):\n    raise exc\n", filename, "exec"), namespace)
        try:
            namespace["serve"](exc)
        except BaseException as caught:  # noqa: BLE001
            return type(caught), caught, caught.__traceback__

    sharer = os.path.join("lib", "multiprocessing", "resource_sharer.py")
    reported = []
    hook = _QuietOnReset(lambda *info: reported.append(info[0].__name__))
    hook(*traceback_of(EOFError(), sharer))
    hook(*traceback_of(ConnectionResetError(104, "reset"), "anywhere.py"))
    assert reported == []
    hook(*traceback_of(EOFError(), "anywhere.py"))
    hook(*traceback_of(ValueError("a real bug"), sharer))
    assert reported == ["EOFError", "ValueError"]


def test_every_loader_in_the_package_uses_the_signal_safe_workers():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fastbeit").rglob("*.py")
                 if "DataLoader(" in p.read_text() and p.name != "workers.py"]
    assert not offenders, f"build DataLoaders with fastbeit.data.workers.data_loader: {offenders}"


_LIVE_AT_EXIT = """
import sys
from fastbeit.data.workers import data_loader
loader = data_loader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True)
iterator = iter(loader)
next(iterator)
sys.modules['__main__'].KEEP = iterator  # alive at exit, as a held traceback keeps it
"""

_LEFT_BY_A_DATASET_ERROR = """
import gc
import torch
from fastbeit.data.workers import data_loader

class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise ValueError("unreadable")

try:
    for batch in data_loader(Broken(), batch_size=2, num_workers=1):
        pass
except ValueError:
    pass
gc.collect()  # the iterator is gone; PyTorch's SIGTERM fallback left its ignoring worker alive
"""


@pytest.mark.parametrize("script", [_LIVE_AT_EXIT, _LEFT_BY_A_DATASET_ERROR], ids=["held-iterator", "dataset-error"])
def test_a_process_exits_with_live_interrupt_ignoring_workers(script):
    """multiprocessing stops live daemonic children at exit with SIGTERM and joins them; workers
    that ignore SIGTERM made that join wait forever (a pytest run that never ended)."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr

def signal_group_while_training(module: str, argv: list, out: Path, sig: int, while_running=None) -> str:
    """Start ``python -m module argv`` in its own process group (the main process and its DataLoader
    workers), wait until it has logged two steps, run ``while_running(pid)``, send ``sig`` to the whole
    group; return its stderr after asserting it saved and exited with 130."""
    cmd = [sys.executable, "-m", module, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while len(logged_steps(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        if while_running is not None:
            while_running(proc.pid)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "killed by signal" not in err and "Traceback" not in err, err[-3000:]
    assert not (out / LOCK_NAME).exists()  # released at exit
    return err


def test_sigterm_to_the_process_group_with_workers_saves_and_locks_out_a_second_run(images, tmp_path, capsys):
    """What SLURM pre-emption, scancel and ``kill -TERM -- -PGID`` do: every process gets SIGTERM."""
    out = tmp_path / "run"

    def second_run(pid: int) -> None:  # on the same folder while the first lives: refused, not interleaved
        err = refused(pretrain.main, pixel_args(images, out, "--resume", "auto"), capsys)
        assert "in use by another run" in err and str(pid) in err

    signal_group_while_training("fastbeit.pretrain", pixel_args(images, out, "--num_workers", "2", "--epochs", "50"),
                                out, signal.SIGTERM, second_run)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["reason"] == "interrupted" and ckpt["global_step"] >= 2


def test_sigterm_to_the_process_group_saves_the_segmentation_run(tmp_path):
    """As for pre-training; segmentation lost its whole run to it."""
    from test_segment import SCRATCH, TINY_FLAGS, make_camvid

    data, out = make_camvid(tmp_path / "camvid", n_train=40, n_val=1), tmp_path / "seg"
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--num_workers") + 1] = "2"
    flags[flags.index("--eval_every") + 1] = "100"
    signal_group_while_training("fastbeit.segment", ["--data", str(data), *SCRATCH, *flags, "--epochs", "50",
                                                     "--output", str(out)], out, signal.SIGTERM)
    assert torch.load(out / "last.pt", weights_only=True)["reason"] == "interrupted"


# --- 2. re-running into an existing run --------------------------------------------------------


def test_rerun_without_resume_is_refused_and_overwrite_starts_afresh(images, tmp_path, capsys):
    assert pretrain.main(pixel_args(images, tmp_path, "--max_steps", "2")) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    err = refused(pretrain.main, pixel_args(images, tmp_path, "--max_steps", "1"), capsys)
    assert "--resume auto" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and logged_steps(tmp_path) == [1, 2]
    assert pretrain.main(pixel_args(images, tmp_path, "--max_steps", "1", "--overwrite")) == 0
    assert logged_steps(tmp_path) == [1]  # one run in the log, not two
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 1
    err = refused(pretrain.main, pixel_args(images, tmp_path, "--resume", "auto", "--overwrite"), capsys)
    assert "give one of them" in err


@pytest.mark.parametrize("cli,product", [(finetune, "best.pt"), (segment, "last.pt"),
                                         (tokenizer_train, "checkpoint.pt")])
def test_every_training_cli_refuses_to_overwrite_a_run(tmp_path, capsys, cli, product):
    data, out = tmp_path / "data", tmp_path / "out"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
    out.mkdir()
    (out / product).write_bytes(b"an earlier run's checkpoint")
    err = refused(cli.main, ["--data", str(data), "--output", str(out)], capsys)
    assert "already holds a run" in err and product in err and "--overwrite" in err
    assert (out / product).read_bytes() == b"an earlier run's checkpoint"


# --- 3. the lock on the output folder ----------------------------------------------------------


def write_lock(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, live.pid)
        with pytest.raises(UserError, match=f"in use by another run \\(pid {live.pid}"):
            with claim_output(tmp_path, ("checkpoint.pt",), resume=False, overwrite=False):
                pass
    finally:
        live.kill()
        live.wait()
    write_lock(tmp_path, live.pid)  # its process is gone now
    with claim_output(tmp_path, ("checkpoint.pt",), resume=False, overwrite=False):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # torn by a crash long ago
    os.utime(tmp_path / LOCK_NAME, (time.time() - 3600,) * 2)
    with claim_output(tmp_path, ("checkpoint.pt",), resume=False, overwrite=False):
        pass
    assert "taking over the stale lock" in capsys.readouterr().err


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with claim_output(tmp_path / "out", ("checkpoint.pt",), resume=False, overwrite=False):
        assert not (tmp_path / "out" / LOCK_NAME).exists()


# --- 4. torn metrics lines and resumed logs ------------------------------------------------------


def test_a_plot_that_cannot_be_drawn_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    """An interrupt inside matplotlib's first import leaves it half-imported; the plot the interrupt
    handler then draws failed with a traceback and the run exited 1 instead of 130 (seen on Python
    3.12). The trainers now import it before training, and a plot never raises."""
    from fastbeit import logging_utils

    def half_imported():
        raise AttributeError("partially initialized module 'matplotlib' has no attribute 'rcParams'")

    monkeypatch.setattr(logging_utils, "_pyplot", half_imported)
    assert logging_utils.plot_curves([{"step": 1, "loss": 2.0}], tmp_path / "curves.png") is False
    err = capsys.readouterr().err
    assert err.startswith("warning: could not draw the plot") and "AttributeError" in err
    assert len(err.strip().splitlines()) == 1


def test_readers_skip_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_a_resumed_run_neither_crashes_on_a_torn_line_nor_repeats_steps(images, tmp_path):
    assert pretrain.main(pixel_args(images, tmp_path, "--max_steps", "3")) == 0
    with open(tmp_path / "metrics.jsonl", "a") as fh:  # logged after the last checkpoint, then a crash mid-append
        fh.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "loss": 1.')
    assert pretrain.main(pixel_args(images, tmp_path, "--max_steps", "5", "--resume", "auto")) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[3]["loss"] != 9.0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "curves.png").is_file()


def test_keep_until_keeps_the_records_of_the_checkpointed_steps(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step})
    log.write({"epoch": 1})  # no step: kept
    assert log.keep_until(2) == 1
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}, {"epoch": 1}]


# --- 5. full disk, read-only output, killed saves, a second Ctrl-C ------------------------------


def test_a_full_disk_at_save_is_one_clear_error_and_the_previous_checkpoint_stays(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"model": {"w": torch.zeros(4)}}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(CheckpointWriteError) as exc:
            atomic_save({"model": {"w": torch.zeros(100_000)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(exc.value)
    assert message.startswith(f"could not write the checkpoint {path}: ") and "previous checkpoint is intact" in message
    assert not any(s in message for s in TORCH_INTERNALS)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def failing_torch_save(monkeypatch, fail_calls):
    """torch.save that writes part of the file, then fails as torch's C++ writer does on a full disk."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) in fail_calls:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_failed_epoch_save_warns_and_training_goes_on(images, tmp_path, monkeypatch, capsys):
    failing_torch_save(monkeypatch, fail_calls={1})
    assert pretrain.main(pixel_args(images, tmp_path, "--batch_size", "20")) == 0  # 2 steps an epoch
    err = capsys.readouterr().err
    assert "warning: could not write the checkpoint" in err and "training goes on" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4  # the next save did it


def test_a_failed_final_save_is_one_error_line(images, tmp_path, monkeypatch, capsys):
    failing_torch_save(monkeypatch, fail_calls=set(range(1, 100)))
    err = refused(pretrain.main, pixel_args(images, tmp_path, "--max_steps", "1"), capsys)
    assert "could not write the checkpoint" in err and "previous checkpoint is intact" in err
    assert not any(s in err for s in TORCH_INTERNALS) and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_interrupt_save_is_one_error_line(images, tmp_path, monkeypatch, capsys):
    interrupt_on_call(monkeypatch, pretrain.Trainer, "step", 2)
    failing_torch_save(monkeypatch, fail_calls=set(range(1, 100)))
    err = refused(pretrain.main, pixel_args(images, tmp_path), capsys)
    assert "could not write the checkpoint" in err and "interrupted at step" not in err


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("fastbeit.rundir.tempfile.TemporaryFile", read_only)
    err = refused(pretrain.main, pixel_args(tmp_path, tmp_path / "out"), capsys)
    assert "cannot write to the output folder" in err and "Read-only" in err


def test_a_killed_saves_temporary_files_are_removed_at_the_next_start(tmp_path, capsys):
    leftover, unrelated = tmp_path / ".checkpoint.pt.k2x9_q0a.tmp", tmp_path / ".notes.tmp"
    leftover.write_bytes(b"gigabytes, in real life")
    unrelated.write_bytes(b"")
    with claim_output(tmp_path, ("checkpoint.pt",), resume=False, overwrite=False):
        pass
    assert not leftover.exists() and unrelated.exists()
    assert "removed 1 temporary file" in capsys.readouterr().err


def test_checkpoints_are_fsynced_and_follow_the_umask(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    old = os.umask(0o027)
    try:
        atomic_save({"model": {}}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
    assert len(synced) >= 2  # the file before the rename, the folder after it


def test_a_second_ctrl_c_does_not_abort_the_interrupt_save(tmp_path, monkeypatch, capsys):
    real = torch.save

    def impatient(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the checkpoint is written
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", impatient)
    save_after_interrupt(lambda: atomic_save({"model": {"w": torch.ones(3)}}, tmp_path / "c.pt"))
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["model"]["w"], torch.ones(3))
    assert "still writing the checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_failing_epoch_save_still_stops_the_run(capsys):
    def save():
        os.kill(os.getpid(), signal.SIGINT)
        raise CheckpointWriteError("could not write the checkpoint c.pt: disk full (x); the previous one is intact")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_or_warn(save, final=False)
    assert "warning: could not write the checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointWriteError):
        save_checkpoint_or_warn(save, final=True)
