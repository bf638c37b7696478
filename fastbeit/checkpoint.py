"""Atomic checkpoints, and loading that refuses a checkpoint of another model."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from fastbeit.errors import UserError

# Config fields that change the parameters' shapes or meaning; the rest (backends, dropout) may differ.
ARCH_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "use_abs_pos_emb",
    "use_rel_pos_bias",
    "use_shared_rel_pos_bias",
    "vocab_size",
)


# atomic_save's temporary files: ``.<name>.<8 random characters>.tmp`` beside the target.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only, no permission); the old file is intact."""


def _write_failure(path: Path, exc: BaseException) -> CheckpointWriteError:
    reasons = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EFBIG: "file too large"}
    reason = reasons.get(getattr(exc, "errno", None), "disk full / read-only")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "inline_container" in detail or "PytorchStreamWriter" in detail:  # torch's C++ writer: say what it means
        detail = "the write stopped short"
    return CheckpointWriteError(f"could not write the checkpoint {path}: {reason} ({detail[:200]}); "
                                "the previous checkpoint is intact")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename: a crash or power loss never
    leaves half a file, and the file gets the user's umask (not mkstemp's 0600). A failed write
    raises :class:`CheckpointWriteError` and leaves the previous file at ``path`` untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        torch.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise _write_failure(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | os.PathLike) -> List[Path]:
    """Delete the temporary files a killed :func:`atomic_save` left in ``folder`` (a checkpoint's size
    each); call it only while holding the folder's lock, so no live save's file is taken."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if TEMP_NAME.match(tmp.name) and tmp.is_file():
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in one line (torch's own messages run to many lines)."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) or text.startswith("Weights only load failed"):
        return "not a torch checkpoint, a torn one, or one holding objects that weights-only loading refuses"
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'no details'}"


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read one of our checkpoints (weights-only unpickling), with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable checkpoint ({load_failure(exc)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a fastbeit checkpoint (no 'model' entry)")
    return ckpt


def check_same_architecture(saved: Optional[Dict[str, Any]], current: Dict[str, Any], path: str) -> None:
    """Raise naming every architecture field where the checkpoint and the current model differ."""
    if saved is None:
        return
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs requested {current.get(k)!r}" for k in ARCH_FIELDS
             if k in saved and saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} is from another model ({'; '.join(diffs)})")


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
                     ignore: Iterable[str] = ()) -> None:
    """Strict load with a message naming the missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    ignore = set(ignore)
    missing = sorted(k for k in own if k not in state and k not in ignore)
    unexpected = sorted(k for k in state if k not in own and k not in ignore)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise UserError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
