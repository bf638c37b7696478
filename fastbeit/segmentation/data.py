"""CamVid-layout segmentation folders: ``ROOT/{train,val,test}/{images/*.jpg,labels/*.png}``.

An image and its label map share the stem; a label is an 8-bit class map with values in
``[0, num_classes)`` or the ignore index. Every label is checked once when the split is opened,
so a bad file is named before training starts rather than deep inside a DataLoader worker.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastbeit.data.folder import BAD_POLICIES, IMAGE_EXTENSIONS, load_rgb
from fastbeit.errors import UserError

Pair = Tuple[Path, Path]


def find_pairs(root: str | os.PathLike, split: str) -> List[Pair]:
    """(image, label) paths of one split, sorted; every image must have a label."""
    base = Path(root) / split
    images_dir, labels_dir = base / "images", base / "labels"
    for folder in (Path(root), base, images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder: expected the layout ROOT/{{train,val,test}}/{{images,labels}}")
    images = sorted(p for p in images_dir.iterdir()
                    if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise UserError(f"no images in {images_dir}")
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [p for p in images if p.stem not in labels]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"image {missing[0]} has no label {labels_dir / (missing[0].stem + '.png')}{more}")
    return [(p, labels[p.stem]) for p in images]


def read_label(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """The class map as uint8 ``[H, W]``; a clear error for a colour label or out-of-range values."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise UserError(f"label {path} is a {img.mode} image; expected an 8-bit class map (mode L or P)")
            label = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise UserError(f"label {path} cannot be read: {exc}") from None
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v >= num_classes and v != ignore_index]
    if bad:
        raise UserError(f"label {path} has values {bad[:8]} outside [0, {num_classes}) that are not the ignore "
                        f"index {ignore_index} (check --num_classes / --ignore_index)")
    return label


def check_split(pairs: Sequence[Pair], num_classes: int, ignore_index: int) -> np.ndarray:
    """Read every label once (values, matching image size); return pixel counts per class."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for image_path, label_path in pairs:
        label = read_label(label_path, num_classes, ignore_index)
        try:
            with Image.open(image_path) as img:
                size = img.size
        except (OSError, ValueError) as exc:
            raise UserError(f"image {image_path} cannot be read: {exc}") from None
        if size != (label.shape[1], label.shape[0]):
            raise UserError(f"image {image_path} is {size[0]}x{size[1]} but its label {label_path} is "
                            f"{label.shape[1]}x{label.shape[0]}")
        counts += np.bincount(label.ravel(), minlength=256)[:num_classes]
    return counts


def read_class_names(root: str | os.PathLike, num_classes: int) -> List[str]:
    """Names from ``ROOT/classes.txt`` (``name`` or ``index name`` per line), else the indices."""
    path = Path(root) / "classes.txt"
    names = [str(i) for i in range(num_classes)]
    if not path.is_file():
        return names
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row, line in enumerate(lines):
        head, _, rest = line.partition(" ")
        index, name = (int(head), rest.strip()) if head.isdigit() and rest.strip() else (row, line)
        if 0 <= index < num_classes:
            names[index] = name
    return names


def check_classes(num_classes: int, ignore_index: int) -> None:
    if num_classes < 1:
        raise UserError(f"--num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise UserError(f"--ignore_index {ignore_index} is one of the classes [0, {num_classes}); pick one outside")


class SegmentationDataset:
    """``transform(rgb PIL image, uint8 label array)`` for each pair; an undecodable image is skipped:
    ``on_bad="next"`` (training) puts the next readable pair in its place, ``"drop"`` (evaluation)
    gives ``None`` so the pair is left out and no image is scored twice.

    The transform's random draws come from torch's RNG seeded by (seed, epoch, index), so an
    epoch's augmentations are the same with any number of workers and after a resume.
    """

    def __init__(self, pairs: Sequence[Pair], transform: Callable, num_classes: int, ignore_index: int,
                 seed: int = 0, on_bad: str = "next") -> None:
        if on_bad not in BAD_POLICIES:
            raise ValueError(f"on_bad must be one of {BAD_POLICIES}, got {on_bad!r}")
        self.pairs = list(pairs)
        self.on_bad = on_bad
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.seed, self.epoch = seed, 0
        self.bad_files: List[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _report_bad(self, path: Path, exc: Exception) -> None:
        if str(path) not in self.bad_files:
            self.bad_files.append(str(path))
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=3)

    def load(self, index: int) -> Optional[Tuple[Image.Image, np.ndarray]]:
        """The pair at ``index`` or, if its image cannot be decoded (a truncated file passes the up-front
        header check), the next readable pair (``on_bad="next"``, as
        :class:`fastbeit.data.folder.ImageFolderDataset` does) or ``None`` (``"drop"``)."""
        for step in range(len(self.pairs)):
            image_path, label_path = self.pairs[(index + step) % len(self.pairs)]
            try:
                image = load_rgb(image_path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                self._report_bad(image_path, exc)
                if self.on_bad == "drop":
                    return None
                continue
            return image, read_label(label_path, self.num_classes, self.ignore_index)
        raise UserError(f"none of the {len(self.pairs)} images of this split could be read")

    def __getitem__(self, index: int):
        pair = self.load(index)
        if pair is None:
            return None
        image, label = pair
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            return self.transform(image, label)


def open_split(root: str | os.PathLike, split: str, transform: Callable, num_classes: int, ignore_index: int,
               limit: Optional[int] = None, seed: int = 0,
               on_bad: str = "next") -> Tuple[SegmentationDataset, np.ndarray]:
    """A checked dataset of one split (its first ``limit`` pairs) and its per-class pixel counts."""
    pairs = find_pairs(root, split)[:limit]
    counts = check_split(pairs, num_classes, ignore_index)
    return SegmentationDataset(pairs, transform, num_classes, ignore_index, seed, on_bad), counts
