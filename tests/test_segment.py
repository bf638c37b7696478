"""Segmentation: pyramid, head, pre-trained loading, metrics, sliding windows, the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupt_on_call
from PIL import Image

from fastbeit import segment
from fastbeit.classifier import resize_rel_pos_table, table_grid
from fastbeit.config import make_config
from fastbeit.errors import UserError
from fastbeit.model import BeitForMaskedImageModeling
from fastbeit.segmentation.backbone import BeitBackbone, scaled_out_indices, segmentation_config
from fastbeit.segmentation.data import open_split
from fastbeit.segmentation.inference import slide_logits, window_starts
from fastbeit.segmentation.metrics import confusion_matrix, segmentation_metrics
from fastbeit.segmentation.model import BeitSegmenter, HeadConfig
from fastbeit.segmentation.optim import layer_decay_groups, learning_rate
from fastbeit.segmentation.pretrained import load_pretrained_backbone

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, drop_path_rate=0.0)


def tiny_cfg(**overrides):
    return segmentation_config(make_config("beit_tiny", **{**TINY, **overrides}), overrides.get("img_size", 64))


# --- model parts -----------------------------------------------------------------------------


def test_out_indices_scale_with_depth():
    assert scaled_out_indices(12) == (3, 5, 7, 11)
    assert scaled_out_indices(24) == (7, 11, 15, 23)
    assert scaled_out_indices(4) == (0, 1, 2, 3)


def test_pyramid_shapes_and_strides():
    torch.manual_seed(0)
    backbone = BeitBackbone(tiny_cfg()).eval()
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert backbone.strides == (2, 4, 8, 16)  # patch/4, patch/2, patch, 2·patch (4/8/16/32 for 16 px patches)
    assert [tuple(f.shape) for f in feats] == [(2, 48, 64 // s, 64 // s) for s in backbone.strides]


def test_head_output_matches_input_size():
    torch.manual_seed(0)
    model = BeitSegmenter(tiny_cfg(), HeadConfig(num_classes=5, channels=16, aux_channels=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 5, 64, 64)
    main, aux = model.forward_train(x)
    assert main.shape == (2, 5, 32, 32) and aux.shape == (2, 5, 8, 8)  # stride patch/4 and patch


def test_pretrained_weights_fill_every_layer_table():
    torch.manual_seed(0)
    mim = BeitForMaskedImageModeling(make_config("beit_tiny", **{**TINY, "img_size": 32, "vocab_size": 50}))
    with torch.no_grad():
        mim.rel_pos_bias.relative_position_bias_table.normal_()
    backbone = BeitBackbone(tiny_cfg(img_size=48))
    load_pretrained_backbone(backbone, mim.state_dict(), "mim.pt")
    shared = mim.rel_pos_bias.relative_position_bias_table
    assert table_grid(shared.shape[0]) == (4, 4)
    for block in backbone.blocks:
        table = block.attn.relative_position_bias_table
        assert table_grid(table.shape[0]) == (6, 6)
        torch.testing.assert_close(table, resize_rel_pos_table(shared, (6, 6), "geometric"))  # the default
    torch.testing.assert_close(backbone.blocks[2].mlp.fc1.weight, mim.blocks[2].mlp.fc1.weight)
    load_pretrained_backbone(backbone, mim.state_dict(), "mim.pt", rel_pos_interpolation="bicubic")
    bicubic = resize_rel_pos_table(shared, (6, 6), "bicubic")
    torch.testing.assert_close(backbone.blocks[0].attn.relative_position_bias_table, bicubic)
    state = {**mim.state_dict(), "blocks.0.extra": torch.zeros(1)}
    with pytest.raises(UserError, match="unexpected.*blocks.0.extra"):
        load_pretrained_backbone(backbone, state, "mim.pt")


def test_layer_decay_scales_and_schedule():
    model = BeitSegmenter(tiny_cfg(), HeadConfig(num_classes=3, channels=8, aux_channels=8))
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale["backbone.patch_embed.proj.weight"] == 0.5**5 and scale["backbone.cls_token"] == 0.5**5
    assert scale["backbone.blocks.0.attn.qkv.weight"] == 0.5**4
    assert scale["backbone.blocks.3.mlp.fc1.weight"] == 0.5
    assert scale["decode_head.classifier.1.weight"] == 1 and scale["backbone.fpn1.0.weight"] == 1
    assert decay["backbone.cls_token"] == 0 and decay["backbone.blocks.0.attn.q_bias"] == 0
    assert decay["backbone.blocks.0.attn.relative_position_bias_table"] == 0.05
    assert learning_rate(0, 100, 1.0, warmup_steps=10) == pytest.approx(1e-6)
    assert learning_rate(10, 100, 1.0, warmup_steps=10) == pytest.approx(0.9)  # poly, power 1
    assert learning_rate(100, 100, 1.0, "cosine", min_lr=0.1) == pytest.approx(0.1)


# --- metrics and inference -------------------------------------------------------------------


def test_miou_on_a_hand_made_case():
    label = torch.tensor([0, 0, 1, 1, 255, 1])
    pred = torch.tensor([0, 1, 1, 2, 3, 1])  # the ignored pixel's prediction (3) must not count
    conf = confusion_matrix(pred, label, num_classes=4, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf)
    assert m["IoU"][:3] == pytest.approx([0.5, 0.5, 0.0])  # class 2: absent but predicted → 0
    assert math.isnan(m["IoU"][3])  # class 3: absent and never predicted → left out
    assert m["mIoU"] == pytest.approx(1 / 3)
    assert m["aAcc"] == pytest.approx(3 / 5)
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_window_starts_cover_the_axis():
    assert window_starts(64, 64, 42) == [0]
    assert window_starts(100, 64, 42) == [0, 36]
    assert window_starts(360, 352, 234) == [0, 8]


def test_sliding_window_equals_plain_forward_when_one_window_covers():
    torch.manual_seed(0)
    model = BeitSegmenter(tiny_cfg(), HeadConfig(num_classes=4, channels=16, aux_channels=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model, x, 4, crop=64), model(x))


def test_sliding_windows_average_and_unpad():
    conv = torch.nn.Conv2d(3, 2, 1)  # pointwise: any window split must give the plain result
    for shape in ((1, 3, 50, 130), (2, 3, 20, 30)):  # overlapping windows; smaller than one window (padded)
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(slide_logits(conv, x, 2, crop=40, stride=26), conv(x))


# --- the CLI ---------------------------------------------------------------------------------


def make_camvid(root: Path, n_train: int = 4, n_val: int = 2, bad_value: int = None, skip_label: str = None):
    """A CamVid-like folder of 64x48 images whose labels follow the colours (classes 0-2, 11 = ignore)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.zeros((48, 64), np.uint8)
            label[: 16 + i] = 1
            label[30:, : 20 + 3 * i] = 2
            label[44:] = 11
            if bad_value is not None and split == "train" and i == 1:
                label[0, 0] = bad_value
            colours = np.array([[40, 60, 200], [150, 150, 150], [90, 90, 40]] + [[0, 0, 0]] * 9, np.uint8)
            pixels = np.clip(colours[label] + rng.integers(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
            name = f"{split}_{i:03d}"
            Image.fromarray(pixels).save(root / split / "images" / f"{name}.jpg")
            if name != skip_label:
                Image.fromarray(label).save(root / split / "labels" / f"{name}.png")
    (root / "classes.txt").write_text("0 Sky\n1 Building\n2 Road\n11 unlabelled\n")
    return root


TINY_FLAGS = ["--num_classes", "3", "--crop_size", "32", "--img_scale", "64", "48", "--batch_size", "2",
              "--num_workers", "0", "--amp", "none", "--no_progress", "--log_every", "1", "--warmup_iters", "1",
              "--head_channels", "16", "--eval_every", "1"]
SCRATCH = ["--model", "beit_tiny", "--patch_size", "8", "--embed_dim", "48", "--depth", "4", "--num_heads", "3"]


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    return make_camvid(tmp_path_factory.mktemp("camvid"))


@pytest.fixture(scope="module")
def mim_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = make_config("beit_tiny", **{**TINY, "img_size": 24, "vocab_size": 64})
    path = tmp_path_factory.mktemp("pretrain") / "checkpoint.pt"
    torch.save({"model": BeitForMaskedImageModeling(cfg).state_dict(), "config": cfg.to_dict(), "args": {}}, path)
    return path


def test_cli_finetunes_and_resumes_exactly(camvid, mim_checkpoint, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--data", str(camvid), "--finetune", str(mim_checkpoint), *TINY_FLAGS, "--epochs", "2"]
    assert segment.main([*common, "--output", str(split), "--max_steps", "3"]) == 0  # stops inside epoch 2
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    train, evals = [r for r in records if "loss" in r], [r for r in records if "mIoU" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals] == [2, 3] and 0 <= evals[0]["mIoU"] <= 1
    assert set(evals[0]["IoU"]) == {"Sky", "Building", "Road"}
    assert (split / "curves.png").stat().st_size > 1000 and (split / "best.pt").is_file()
    last = torch.load(split / "last.pt", weights_only=True)
    assert last["kind"] == "segmentation" and last["config"]["img_size"] == 32 and last["global_step"] == 3
    assert "mIoU" in capsys.readouterr().out

    assert segment.main([*common, "--output", str(split), "--resume", "auto"]) == 0
    assert segment.main([*common, "--output", str(straight)]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    assert segment.main(["--data", str(camvid), "--resume", str(split / "best.pt"), "--eval_only",
                         "--output", str(split), "--num_classes", "3", "--num_workers", "0", "--no_progress"]) == 0
    assert json.loads((split / "eval_val.json").read_text())["mIoU"] is not None


def test_ctrl_c_saves_first(camvid, tmp_path, monkeypatch, capsys):
    interrupt_on_call(monkeypatch, segment.Trainer, "step", 2)
    assert segment.main(["--data", str(camvid), *SCRATCH, *TINY_FLAGS, "--output", str(tmp_path)]) == 130
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["reason"] == "interrupted" and saved["global_step"] == 1
    assert "--resume" in capsys.readouterr().err


def test_cli_on_real_camvid(shared_data, tmp_path):
    data = shared_data / "camvid"
    if not (data / "train").is_dir():
        pytest.skip(f"CamVid not found at {data}")
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--num_classes") + 1] = "11"
    flags[flags.index("--img_scale") + 1: flags.index("--img_scale") + 3] = ["96", "72"]
    assert segment.main(["--data", str(data), *SCRATCH, *flags, "--epochs", "1", "--max_train_images", "2",
                         "--max_val_images", "1", "--output", str(tmp_path)]) == 0
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert "Pedestrian" in record["IoU"] and 0 <= record["aAcc"] <= 1


def run_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        segment.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_label_value_outside_the_classes_is_named(tmp_path, capsys):
    data = make_camvid(tmp_path / "bad", bad_value=7)
    err = run_error(["--data", str(data), *SCRATCH, *TINY_FLAGS, "--output", str(tmp_path / "o")], capsys)
    assert "train_001.png" in err and "[7]" in err and "ignore index 11" in err


def test_clear_errors(tmp_path, camvid, capsys):
    data = make_camvid(tmp_path / "nolabel", skip_label="train_002")
    assert "train_002.jpg has no label" in run_error(["--data", str(data), *SCRATCH, *TINY_FLAGS], capsys)
    assert "is not a folder" in run_error(["--data", str(tmp_path / "nowhere"), *SCRATCH, *TINY_FLAGS], capsys)
    assert "--data is required" in run_error([*SCRATCH], capsys)
    assert "is one of the classes" in run_error(["--data", str(camvid), "--ignore_index", "1", *SCRATCH], capsys)
    err = run_error(["--data", str(camvid), *SCRATCH, *TINY_FLAGS, "--crop_size", "36"], capsys)
    assert "not a multiple of the patch size 8" in err
    torch.save({"model": {}, "kind": "segmentation", "config": {}}, tmp_path / "seg.pt")
    err = run_error(["--data", str(camvid), *TINY_FLAGS, "--finetune", str(tmp_path / "seg.pt")], capsys)
    assert "use --resume" in err or "continue it with --resume" in err


def test_a_truncated_image_is_skipped_in_the_workers(tmp_path):
    """Its header passes the up-front check; decoding fails in a DataLoader worker mid-epoch."""
    data = make_camvid(tmp_path / "truncated")
    image = data / "train" / "images" / "train_001.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 4 // 5])
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--num_workers") + 1] = "2"
    assert segment.main(["--data", str(data), *SCRATCH, *flags, "--epochs", "1", "--eval_every", "5",
                         "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "last.pt").is_file()
    dataset, _ = open_split(data, "train", lambda img, label: (img.size, label.shape), 3, 11)
    with pytest.warns(UserWarning, match="skipping unreadable image .*train_001.jpg"):
        assert dataset[1] == ((64, 48), (48, 64))  # the next pair stands in
    assert dataset.bad_files == [str(image)]


def test_an_unreadable_val_image_is_left_out_of_the_evaluation(tmp_path, capsys):
    """Replacing it by its neighbour would score that neighbour twice."""
    data = make_camvid(tmp_path / "badval", n_val=3)
    image = data / "val" / "images" / "val_001.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 4 // 5])
    dataset, _ = open_split(data, "val", lambda img, label: (img.size, label.shape), 3, 11, on_bad="drop")
    with pytest.warns(UserWarning, match="skipping unreadable image .*val_001.jpg"):
        assert dataset[1] is None
    assert dataset[2] == ((64, 48), (48, 64))
    assert segment.main(["--data", str(data), *SCRATCH, *TINY_FLAGS, "--epochs", "1", "--eval_every", "5",
                         "--output", str(tmp_path / "out")]) == 0
    assert "evaluation left out 1 unreadable image(s) of the 3 in val" in capsys.readouterr().out
