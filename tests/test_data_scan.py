"""One image-folder scan for every CLI: broken links, names that are not UTF-8, link loops, and
skipped files counted once per run (not once per worker per epoch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbeit import linprobe
from fastbeit.config import make_config
from fastbeit.data.folder import ImageFolderDataset, ImageLoader, find_images
from fastbeit.errors import UserError
from fastbeit.model import BeitForMaskedImageModeling

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image")
NOT_UTF8 = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: a name that is not valid UTF-8


def save_image(path: Path, value: int = 0, size: int = 12) -> None:
    pixels = np.full((size, size, 3), value, dtype=np.uint8)
    pixels[: size // 2] = 255 - value
    Image.fromarray(pixels).save(path)


def test_symlink_loops_are_read_once_and_keep_their_labels(tmp_path):
    for name, count in (("a", 3), ("b", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            save_image(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # back to the root
    (tmp_path / "b" / "self").symlink_to(tmp_path / "b")  # to itself
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b")  # into another class
    with pytest.warns(UserWarning, match="which is read already"):
        files = find_images(tmp_path)
    assert len(files) == 5  # the real files, each once
    ds = ImageFolderDataset(tmp_path, with_labels=True)
    assert ds.classes == ["a", "b"] and sorted(ds.targets) == [0, 0, 0, 1, 1]
    assert all(ds.classes[t] == f.parent.name for f, t in zip(ds.files, ds.targets))


def test_broken_links_and_non_utf8_names_are_found_and_the_broken_ones_skipped(tmp_path):
    save_image(tmp_path / "good.png")
    save_image(tmp_path / NOT_UTF8)
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    ds = ImageFolderDataset(tmp_path, on_bad="drop")
    assert sorted(p.name for p in ds.files) == sorted(["good.png", NOT_UTF8, "gone.jpg"])
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        loaded = [ds[i] for i in range(len(ds))]
    assert sum(img is not None for img in loaded) == 2
    assert [Path(p).name for p in ds.bad_files] == ["gone.jpg"]


def test_skipped_files_are_counted_once_per_run_and_reported_after_each_pass(tmp_path, capfd):
    for i in range(6):
        save_image(tmp_path / f"img{i}.png", value=i)
    for i in (1, 4):  # not neighbours: no two workers meet the same bad file at once
        (tmp_path / f"img{i}.png").write_bytes(b"\x89PNG but not really")
    ds = ImageFolderDataset(tmp_path, transform=lambda img: torch.zeros(1))
    loader = ImageLoader(ds, batch_size=2, num_workers=2)
    for _ in range(2):
        assert sum(len(batch) for batch in loader) == 6  # each replaced by the next readable image
    assert len(ds.bad_files) == 2  # the workers marked them in memory the main process sees
    err = capfd.readouterr().err
    reports = [line for line in err.splitlines() if "skipped so far" in line]
    assert len(reports) == 2 and all("2 unreadable image(s)" in line for line in reports)


def test_a_skipped_evaluation_image_is_left_out_and_said(tmp_path, capfd):
    for i in range(5):
        save_image(tmp_path / f"img{i}.png", value=i)
    (tmp_path / "img2.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tmp_path, transform=lambda img: torch.zeros(1), on_bad="drop")
    assert sum(len(batch) for batch in ImageLoader(ds, batch_size=2)) == 4
    assert "1 unreadable image(s)" in capfd.readouterr().err
    for name in ("img0.png", "img1.png", "img3.png", "img4.png"):
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.raises(UserError, match="none of the images"):
        list(ImageLoader(ImageFolderDataset(tmp_path, transform=lambda img: torch.zeros(1), on_bad="drop")))


@pytest.fixture
def probe_data(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("green", "red")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                pixels[..., c] += 190
                Image.fromarray(pixels).save(folder / f"{i}.png")
    green = tmp_path / "data" / "train" / "green"
    Image.open(green / "0.png").save(green / NOT_UTF8)
    (green / "broken.png").symlink_to(green / "nowhere.png")
    (tmp_path / "data" / "val" / "red" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    cfg = make_config("beit_tiny", img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2, vocab_size=16)
    torch.save({"model": BeitForMaskedImageModeling(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "pre.pt")
    return tmp_path


def test_linprobe_skips_a_broken_link_and_reads_a_non_utf8_name(probe_data, capsys):
    argv = ["--checkpoint", str(probe_data / "pre.pt"), "--data", str(probe_data / "data"), "--output",
            str(probe_data / "out"), "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--amp", "none",
            "--no_progress"]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert linprobe.main(argv) == 0
    captured = capsys.readouterr()
    assert "on 4 val images" in captured.out  # the broken val link is left out, not replaced
    assert "left out" in captured.err
    features = torch.load(next((probe_data / "out" / "cache").glob("features-*.pt")), weights_only=True)
    assert len(features["train_labels"]) == 9  # 8 + the non-UTF-8 one; the broken link is left out
