"""Data for fine-tuning: class-folder datasets, the train / eval transforms, mixup and cutmix.

The original recipe (timm's ``create_transform`` and ``Mixup``): RandomResizedCrop (bicubic) →
horizontal flip → RandAugment ``rand-m9-mstd0.5-inc1`` → normalize → RandomErasing (p 0.25,
per-pixel noise); mixup α 0.8 / cutmix α 1.0, switching with probability 0.5, one mixing
factor per batch, label smoothing 0.1 folded into the soft targets.

RandAugment is timm's own (``timm.data.auto_augment.rand_augment_transform``, the op set and
magnitude scale the original used), with the hyper-parameters timm's ``create_transform`` passes:
translation up to 45 % of the side, the normalization mean as fill colour, the training
interpolation for the geometric ops. Colour jitter is off, as in timm whenever RandAugment is on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from fastbeit.data.folder import ImageFolderDataset
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, INTERPOLATIONS
from fastbeit.errors import UserError

DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
                "nearest": Image.NEAREST}
RAND_AUGMENT_KEYS = ("n", "m", "mstd", "mmax", "p", "inc")  # timm's spec keys that make sense here


def parse_auto_augment(spec: Optional[str], mean: Sequence[float] = BEIT_MEAN, input_size: int = 224,
                       interpolation: str = "bicubic") -> Optional[Callable]:
    """``rand-m9-mstd0.5-inc1`` (timm's syntax) → timm's RandAugment as ``create_transform`` builds
    it; ``none`` or empty → None. The spec is checked here so a typo is a clear error, not a
    traceback from inside timm."""
    if not spec or spec.lower() == "none":
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise UserError(f"--aa {spec!r}: only RandAugment ('rand-m9-mstd0.5-inc1') or 'none' is supported")
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match or match.group(1) not in RAND_AUGMENT_KEYS:
            raise UserError(f"--aa {spec!r}: cannot read {part!r} (known: {', '.join(RAND_AUGMENT_KEYS)})")
    from timm.data.auto_augment import rand_augment_transform

    hparams = dict(translate_const=int(input_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=PIL_RESAMPLE[interpolation])
    augment = rand_augment_transform(spec, hparams)
    for op in augment.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return augment


def posterize(img: Image.Image, bits: int, **_: object) -> Image.Image:
    """Keep ``bits`` bits per channel. PosterizeIncreasing asks for 0 bits at magnitude 10 (reached
    by m9 plus its noise); Pillow ≥ 12 refuses 0, older Pillow (the original's) gave a black image."""
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits)


def build_train_transform(
    input_size: int, auto_augment: Optional[str] = DEFAULT_AUTO_AUGMENT, reprob: float = 0.25,
    interpolation: str = "bicubic", mean: Sequence[float] = BEIT_MEAN, std: Sequence[float] = BEIT_STD,
    scale: Tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
) -> T.Compose:
    """The original fine-tuning augmentation (timm's ``create_transform(is_training=True)``)."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}; choose from {sorted(INTERPOLATIONS)}")
    steps = [T.RandomResizedCrop(input_size, scale=scale, interpolation=INTERPOLATIONS[interpolation]),
             T.RandomHorizontalFlip(hflip)]
    augment = parse_auto_augment(auto_augment, mean, input_size, interpolation)
    if augment is not None:
        steps.append(augment)
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if reprob > 0:
        steps.append(T.RandomErasing(p=reprob, value="random"))
    return T.Compose(steps)


def build_eval_transform(
    input_size: int, mean: Sequence[float] = BEIT_MEAN, std: Sequence[float] = BEIT_STD,
    crop_pct: Optional[float] = None, interpolation: str = "bicubic",
) -> T.Compose:
    """Resize the short side to ``size / crop_pct`` then centre-crop, as the original: crop_pct
    0.875 below 384 px, 1.0 from 384 px (the short side becomes ``size``; the aspect ratio is kept,
    never squashed)."""
    mode = INTERPOLATIONS[interpolation]
    if crop_pct is None:
        crop_pct = 0.875 if input_size < 384 else 1.0
    steps = [T.Resize(int(input_size / crop_pct), interpolation=mode), T.CenterCrop(input_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


# ---------------------------------------------------------------------------------------------
# Mixup / cutmix


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets: ``1 - s + s/K`` on the label, ``s/K`` elsewhere (timm's convention)."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return out.scatter_(1, targets.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> Tuple[int, int, int, int]:
    """A box of about ``(1 - lam)`` of the image, centred uniformly, clipped to the image."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


class MixupCutmix:
    """Mix each batch with itself reversed: mixup (λ ~ Beta(α, α)) or cutmix (a pasted box, λ
    corrected to the pasted area), one λ per batch, targets mixed with the same λ."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, rng: Optional[random.Random] = None) -> None:
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.rng = rng if rng is not None else random.Random()

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample(self) -> Tuple[float, bool]:
        """(λ, use cutmix) for one batch."""
        if not self.active or self.rng.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return self.rng.betavariate(alpha, alpha), use_cutmix

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self.sample()
        images = images.clone()
        if lam < 1.0:
            flipped = images.flip(0)
            if use_cutmix:
                top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, self.rng)
                images[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
            else:
                images = images * lam + flipped * (1.0 - lam)
        soft = smooth_one_hot(targets, self.num_classes, self.label_smoothing)
        return images, soft * lam + soft.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(target · log_softmax(logits))``."""
    return torch.sum(-soft_targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Datasets


def class_folders(root: str | Path) -> list:
    """The first-level sub-folders of ``root`` (the class names), sorted; a link back to ``root``
    or to another class folder is no class of its own."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    seen = {_identity(root)}
    names = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and _identity(p) not in seen:
            seen.add(_identity(p))
            names.append(p.name)
    return sorted(names)


def _identity(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def check_nb_classes(nb_classes: Optional[int], classes: Sequence[str], where: str | Path) -> None:
    if nb_classes is not None and nb_classes < len(classes):
        raise UserError(f"--nb_classes {nb_classes} is too small: {where} has {len(classes)} classes "
                        f"(labels 0..{len(classes) - 1})")


def class_folder_datasets(
    train_root: str | Path, val_root: str | Path, train_transform, val_transform, nb_classes: Optional[int] = None,
    train_on_bad: str = "next",
) -> Tuple[ImageFolderDataset, ImageFolderDataset, list]:
    """Train and val datasets that share one class list; clear errors for mismatches. An unreadable
    val image is left out (never replaced: it would count its neighbour twice)."""
    train_classes, val_classes = class_folders(train_root), class_folders(val_root)
    if not train_classes:
        raise UserError(f"{train_root} has no class sub-folders (expected {train_root}/<class>/<image>)")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"the class folders of {train_root} and {val_root} differ: only in train {only_train[:10]}, "
                        f"only in val {only_val[:10]}")
    check_nb_classes(nb_classes, train_classes, train_root)
    train = ImageFolderDataset(train_root, train_transform, with_labels=True, classes=train_classes,
                               on_bad=train_on_bad)
    val = ImageFolderDataset(val_root, val_transform, with_labels=True, classes=train_classes, on_bad="drop")
    return train, val, train_classes
