"""A training run's output folder: writable, locked against a second run, free of a killed save's
temporary files, and never silently overwritten by a run that was not asked to continue it."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from fastbeit.checkpoint import remove_stale_temp_files
from fastbeit.errors import UserError

LOCK_NAME = ".fastbeit.lock"
TORN_LOCK_GRACE_S = 10.0  # an unreadable lock younger than this may be one another run is writing now


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (Linux), to tell a live owner from a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class OutputLock:
    """``OUTPUT/.fastbeit.lock`` holding the owner's PID and host. A lock whose process is gone (on
    this host) is stale and taken over with a note; a live one, or one from another host, is an error."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.held = False

    def describe_holder(self) -> Optional[dict]:
        """The holder's record, or None when the lock is stale (its process is gone)."""
        try:
            text = self.path.read_text()
            holder = json.loads(text)
            int(holder["pid"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # torn: a crash while writing it, or being written now
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None
            return None if age >= TORN_LOCK_GRACE_S else {"pid": "?", "host": "?"}
        pid = int(holder["pid"])
        if holder.get("host") != socket.gethostname():
            return holder  # cannot tell from here whether it is alive
        if pid == os.getpid() or not _pid_alive(pid):
            return None
        start = holder.get("start")
        if start is not None and _process_start(pid) not in (None, start):
            return None  # the PID now belongs to another process
        return holder

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.describe_holder()
                if holder is not None:
                    raise UserError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on host "
                        f"{holder.get('host')}): give this run another --output, or if that run is gone, delete "
                        f"{self.path}") from None
                if not self._ours():
                    print(f"note: taking over the stale lock {self.path} (its run is gone)", file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record) + "\n")
            self.held = True
            atexit.register(self.release)
            return
        raise UserError(f"could not take the lock {self.path}: another run keeps taking it")

    def _ours(self) -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            holder = json.loads(self.path.read_text())
            return int(holder["pid"]) == os.getpid() and holder.get("host") == socket.gethostname()
        return False

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._ours():
                with contextlib.suppress(OSError):
                    self.path.unlink()
            atexit.unregister(self.release)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, so a read-only or full output fails now, not after training."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as fh:
            fh.write(b"x")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain run (readable before the process group starts)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def claim_output(folder: str | os.PathLike, products: Sequence[str], resume: bool, overwrite: bool,
                 main: Optional[bool] = None) -> Iterator[Path]:
    """Hold ``folder`` for one run (only the main process does the checks and holds the lock).

    ``products`` are the files a run writes there (checkpoints, logs, plots). If any exists the
    folder holds an earlier run: without ``resume`` it is refused unless ``overwrite``, which
    deletes them so the new run starts clean (no second run appended to its metrics).
    """
    folder = Path(folder)
    if resume and overwrite:
        raise UserError("--resume continues the run in --output and --overwrite deletes it: give one of them")
    if not (is_main_process() if main is None else main):
        yield folder
        return
    check_writable(folder)
    lock = OutputLock(folder)
    lock.acquire()
    try:
        removed = remove_stale_temp_files(folder)
        if removed:
            print(f"note: removed {len(removed)} temporary file(s) a killed checkpoint save left in {folder}",
                  file=sys.stderr)
        existing = [name for name in products if (folder / name).exists()]
        if existing and not resume:
            if not overwrite:
                raise UserError(f"{folder} already holds a run ({', '.join(existing)}): continue it with "
                                "--resume auto, or pass --overwrite to delete it and start afresh")
            for name in existing:
                (folder / name).unlink()
        yield folder
    finally:
        lock.release()
