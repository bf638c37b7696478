"""A recursive image-folder dataset that survives bad files, and its loader.

Every CLI reads image folders through :func:`find_images`: it follows links to folders but
reads each real folder once (a link loop neither hangs nor multiplies images), and skips hidden
entries. Any image mode (greyscale, CMYK, palette, RGBA) is converted to RGB. A file that cannot
be decoded (corrupt, truncated, a broken link, not an image) is skipped: for training the next
readable image takes its place; for evaluation (``on_bad="drop"``) it is left out, so no image
counts twice. Each bad file is marked in memory that the DataLoader workers share, so it is
tried and named once per run, and :class:`ImageLoader` says the run's total after each pass.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import default_collate
from tqdm import tqdm

from fastbeit.data.workers import data_loader
from fastbeit.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What decoding a bad file raises (DecompressionBombError is none of the others).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
BAD_POLICIES = ("next", "drop")


def shown(path: str | os.PathLike) -> str:
    """A path safe to print: a name that is not valid UTF-8 shows its bytes escaped."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _walk_once(root: Path, exts: Tuple[str, ...]) -> List[Path]:
    """Image files under ``root``, breadth first so each real folder is read by its shortest path."""
    files: List[Path] = []
    seen: Dict[Tuple[int, int], Path] = {}
    queue = deque([root])
    while queue:
        folder = queue.popleft()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                warnings.warn(f"skipping {shown(folder)}: a link to {shown(seen[key])}, which is read already",
                              stacklevel=3)
                continue
            seen[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            warnings.warn(f"skipping folder {shown(folder)}: {exc}", stacklevel=3)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    queue.append(path)
                    continue
                regular = entry.is_file() or (entry.is_symlink() and not path.exists())  # a broken link counts
            except OSError:
                regular = True  # unreadable: decoding will say why, and it is counted
            if regular and entry.name.lower().endswith(exts):
                files.append(path)
    return sorted(files)


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All image files under ``root`` (recursive, sorted); a clear error if there are none."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder")
    exts = tuple(e.lower() for e in extensions)
    files = _walk_once(root, exts)
    if not files:
        raise UserError(
            f"no images found under {root} (looked recursively for {', '.join(exts)})"
        )
    return files


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncation shows now, not later) and convert it to RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """One image a user named (not a dataset's): RGB, or one clear :class:`UserError` line. An image
    above PIL's decompression-bomb warning size is read with a one-line note; one above its error
    size is refused."""
    if not Path(path).is_file():
        raise UserError(f"image {shown(path)} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = load_rgb(path)
        except Image.DecompressionBombError as exc:
            raise UserError(f"image {shown(path)} is too large to decode safely: {exc}") from None
        except UNREADABLE as exc:
            raise UserError(f"image {shown(path)} cannot be read: {exc}") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            print(f"warning: image {shown(path)} is very large ({img.width}x{img.height}); decoding it needs much "
                  "memory", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return img


class ImageFolderDataset:
    """Images under ``root``; with ``with_labels`` the first-level sub-folders are the classes.

    ``__getitem__`` returns ``transform(image)`` (and the class index when labelled). An unreadable
    file is replaced by the next readable one (``on_bad="next"``, for training) or gives ``None``
    (``"drop"``, for evaluation: :func:`drop_skipped` leaves it out of the batch).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Optional[Callable] = None,
        with_labels: bool = False,
        classes: Optional[Sequence[str]] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        on_bad: str = "next",
    ) -> None:
        if on_bad not in BAD_POLICIES:
            raise ValueError(f"on_bad must be one of {BAD_POLICIES}, got {on_bad!r}")
        self.root = Path(root)
        self.transform = transform
        self.on_bad = on_bad
        self.files = find_images(self.root, extensions)
        self.with_labels = with_labels
        self.classes: List[str] = []
        self.targets: List[int] = []
        if with_labels:
            found = sorted({f.relative_to(self.root).parts[0] for f in self.files if f.parent != self.root})
            self.classes = list(classes) if classes is not None else found
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted(set(found) - set(index))
            if unknown:
                raise UserError(f"{self.root} has class folders not in the class list: {unknown[:5]}")
            self.files = [f for f in self.files if f.parent != self.root]
            self.targets = [index[f.relative_to(self.root).parts[0]] for f in self.files]
        # One flag per file in shared memory: the DataLoader workers (forked or spawned) mark a bad
        # file for each other and for the main process, which counts them.
        self.bad_flags = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def bad_files(self) -> List[str]:
        """Every file found unreadable so far in this run (by any worker)."""
        return [str(self.files[i]) for i in self.bad_flags.nonzero().flatten().tolist()]

    def _mark_bad(self, i: int, exc: Exception) -> None:
        if not self.bad_flags[i]:
            self.bad_flags[i] = 1
            warnings.warn(f"skipping unreadable image {shown(self.files[i])}: {exc}", stacklevel=3)

    def load(self, index: int) -> Tuple[Optional[Image.Image], int]:
        """The image at ``index`` or, if it is unreadable, the next readable one (``(None, index)``
        when dropping)."""
        tries = len(self.files) if self.on_bad == "next" else 1
        for step in range(tries):
            i = (index + step) % len(self.files)
            if self.bad_flags[i]:
                continue
            try:
                return load_rgb(self.files[i]), i
            except UNREADABLE as exc:
                self._mark_bad(i, exc)
        if self.on_bad == "drop":
            return None, index
        raise UserError(f"none of the {len(self.files)} images under {self.root} could be read")

    def __getitem__(self, index: int):
        img, used = self.load(index)
        if img is None:
            return None
        out = self.transform(img) if self.transform is not None else img
        if self.with_labels:
            return out, self.targets[used]
        return out


def drop_skipped(batch: list):
    """Collate what a ``"drop"`` dataset could read; ``None`` when nothing in the batch could."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def folder_dataset(dataset) -> Optional[ImageFolderDataset]:
    """The :class:`ImageFolderDataset` under ``dataset`` (through ``Subset`` wrappers), if any."""
    while not isinstance(dataset, ImageFolderDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, ImageFolderDataset) else None


class ImageLoader:
    """A ``DataLoader`` over an image folder that leaves out dropped samples and, after each pass
    (an epoch, an evaluation), says in one line how many unreadable files the run has skipped (each
    was named once, with the reason, when first met)."""

    def __init__(self, dataset, **loader_kwargs) -> None:
        self.dataset = dataset
        self.folder = folder_dataset(dataset)
        self.loader = data_loader(dataset, collate_fn=drop_skipped, **loader_kwargs)  # workers leave signals alone

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = 0
        try:
            for batch in self.loader:
                if batch is not None:
                    batches += 1
                    yield batch
        finally:
            self.report()
        if batches == 0 and len(self.loader) > 0:
            raise UserError(f"none of the images under {self.folder.root if self.folder else 'the data'} "
                            "could be read")

    def skipped_message(self) -> Optional[str]:
        """The line :meth:`report` prints; ``None`` when nothing was skipped."""
        if self.folder is None or not self.folder.bad_flags.any():
            return None
        what = "each replaced by the next readable image" if self.folder.on_bad == "next" else "left out"
        return (f"{int(self.folder.bad_flags.sum())} unreadable image(s) under {shown(self.folder.root)} skipped so "
                f"far in this run ({what})")

    def report(self) -> None:
        msg = self.skipped_message()
        if msg is not None:
            tqdm.write(f"warning: {msg}", file=sys.stderr)
