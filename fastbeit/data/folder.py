"""A recursive image-folder dataset that survives bad files.

Any image mode (greyscale, CMYK, palette, RGBA) is converted to RGB. A file that cannot be
decoded (corrupt, truncated, not an image) is skipped: the next readable image is returned in
its place, the file is counted, and a warning names it once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image

from fastbeit.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All image files under ``root`` (recursive, sorted); a clear error if there are none."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(exts) and not name.startswith(".")
    )
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


class ImageFolderDataset:
    """Images under ``root``; with ``with_labels`` the first-level sub-folders are the classes.

    ``__getitem__`` returns ``transform(image)`` (and the class index when labelled).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Optional[Callable] = None,
        with_labels: bool = False,
        classes: Optional[Sequence[str]] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
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
        self.bad_files: List[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def _report_bad(self, path: Path, exc: Exception) -> None:
        if str(path) not in self.bad_files:
            self.bad_files.append(str(path))
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=3)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        """The image at ``index`` or, if it is unreadable, the next readable one."""
        for step in range(len(self.files)):
            i = (index + step) % len(self.files)
            try:
                return load_rgb(self.files[i]), i
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                self._report_bad(self.files[i], exc)
        raise UserError(f"none of the {len(self.files)} images under {self.root} could be read")

    def __getitem__(self, index: int):
        img, used = self.load(index)
        out = self.transform(img) if self.transform is not None else img
        if self.with_labels:
            return out, self.targets[used]
        return out
