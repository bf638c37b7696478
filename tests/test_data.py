"""Image folders that survive bad files, and the faithful two-view transform."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from fastbeit.data import BeitPretrainTransform, ImageFolderDataset, TwoViewTransform, find_images, unmap_pixels
from fastbeit.data.transforms import sample_crop_box
from fastbeit.errors import UserError
from fastbeit.masking import MaskingGenerator


def structured_image(size=(200, 160), mode="RGB") -> Image.Image:
    """Smooth gradients plus a bright off-centre square: a flip or another crop is obvious."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    rgb[h // 5 : h // 2, w // 8 : w // 3] = 255
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    structured_image().save(tmp_path / "a" / "one.JPG")
    structured_image(mode="L").save(tmp_path / "a" / "deep" / "grey.png")
    structured_image(mode="CMYK").save(tmp_path / "b" / "cmyk.jpeg")
    structured_image(mode="RGBA").save(tmp_path / "b" / "alpha.webp")
    structured_image(mode="P").save(tmp_path / "b" / "palette.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    return tmp_path


def test_find_images_is_recursive_and_case_insensitive(image_folder):
    names = sorted(p.name for p in find_images(image_folder))
    assert names == ["alpha.webp", "cmyk.jpeg", "grey.png", "one.JPG", "palette.png"]


def test_every_mode_becomes_rgb(image_folder):
    ds = ImageFolderDataset(image_folder)
    assert all(ds[i].mode == "RGB" for i in range(len(ds)))


def test_labels_from_first_level_folders(image_folder):
    ds = ImageFolderDataset(image_folder, with_labels=True)
    assert ds.classes == ["a", "b"]
    assert sorted(ds.targets) == [0, 0, 1, 1, 1]


def test_missing_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")


def test_bad_files_are_skipped_counted_and_reported_once(image_folder):
    good = (image_folder / "a" / "one.JPG").read_bytes()
    (image_folder / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (image_folder / "a" / "garbage.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolderDataset(image_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            images = [ds[i] for i in range(len(ds))]
    assert all(img.mode == "RGB" for img in images)
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.bad_files) == ["garbage.png", "truncated.jpg"]
    assert len([w for w in caught if "skipping unreadable" in str(w.message)]) == 2


def test_two_views_share_one_crop_and_flip():
    img = structured_image((256, 200))
    views = TwoViewTransform(color_jitter=0.0)
    for seed in range(6):
        torch.manual_seed(seed)
        random.seed(seed)
        patches, tokens = views(img)
        assert patches.shape == (3, 224, 224) and tokens.shape == (3, 112, 112)
        big = (patches * 0.5 + 0.5).unsqueeze(0)
        small = unmap_pixels(tokens).unsqueeze(0)
        down = F.interpolate(big, size=112, mode="area")
        same = (down - small).abs().mean().item()
        flipped = (down.flip(-1) - small).abs().mean().item()
        assert same < 0.02, same
        assert flipped > 3 * same or flipped > 0.05


def test_value_ranges_and_mask(image_folder):
    gen = MaskingGenerator(14, 75, 16)
    ds = ImageFolderDataset(image_folder, BeitPretrainTransform(TwoViewTransform(), gen))
    patches, tokens, mask = ds[0]
    assert patches.min() >= -1 and patches.max() <= 1
    assert tokens.min() >= 0.1 - 1e-6 and tokens.max() <= 0.9 + 1e-6
    assert mask.dtype == torch.bool and mask.shape == (196,) and 0 < mask.sum() <= 75


def test_crop_boxes_follow_random_resized_crop():
    """Our box sampler against torchvision's get_params: same scale and ratio distributions."""
    rng = random.Random(0)
    torch.manual_seed(0)
    w, h = 300, 240
    ours = np.array([sample_crop_box(w, h, rng=rng) for _ in range(4000)], dtype=float)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
                       for _ in range(4000)], dtype=float)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()
    area = lambda b: b[:, 2] * b[:, 3] / (w * h)
    log_ratio = lambda b: np.log(b[:, 3] / b[:, 2])
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.02
    assert abs(np.median(area(ours)) - np.median(area(theirs))) < 0.03
    assert abs(log_ratio(ours).std() - log_ratio(theirs).std()) < 0.02


def test_real_photos_from_shared_data(shared_data):
    files = find_images(shared_data / "imagenette" / "val")[:8]
    gen = MaskingGenerator(14, 75, 16)
    transform = BeitPretrainTransform(TwoViewTransform(), gen)
    for path in files:
        patches, tokens, mask = transform(Image.open(path).convert("RGB"))
        assert patches.shape == (3, 224, 224) and tokens.shape == (3, 112, 112)
