"""Fine-tuning: the classifier, pre-trained loading, layer decay, mixup, transforms and the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import free_port, interrupt_on_call
from PIL import Image

from fastbeit import finetune
from fastbeit.classifier import (
    BeitForImageClassification,
    layer_decay_groups,
    load_pretrained,
    resize_pos_embed,
    resize_rel_pos_table,
    topk_correct,
)
from fastbeit.config import make_config
from fastbeit.data.classification import (
    MixupCutmix,
    build_eval_transform,
    build_train_transform,
    parse_auto_augment,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from fastbeit.errors import UserError
from fastbeit.model import BeitForMaskedImageModeling
from fastbeit.optim import build_adamw, set_step_values

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, vocab_size=97, drop_path_rate=0.0)
PER_LAYER = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)




def tiny_pretrained(**overrides) -> BeitForMaskedImageModeling:
    """A pre-training model with a non-trivial shared table and LayerScale."""
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(make_config("beit_tiny", **{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name:
                p.normal_(0, 0.5)
    return model


def make_class_folders(root: Path, classes=("cat", "dog", "fox"), per_class=(6, 2), size=40) -> Path:
    """train/ and val/ class folders of small images whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Model


def test_classifier_shapes_pooling_and_head_init():
    cfg = make_config("beit_tiny", **TINY, **PER_LAYER)
    torch.manual_seed(1)
    model = BeitForImageClassification(cfg, num_classes=7)
    torch.manual_seed(1)
    unscaled = BeitForImageClassification(cfg, num_classes=7, init_scale=1.0)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7) and model.get_num_layers() == 2
    assert model.forward_features(x).shape == (2, 48)
    assert model.forward_features(x, return_block=1).shape == (2, 48)
    torch.testing.assert_close(model.head.weight, unscaled.head.weight * 0.001, rtol=0, atol=0)
    assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.2) and not model.head.bias.any()
    keys = model.state_dict().keys()
    assert "fc_norm.weight" in keys and "norm.weight" not in keys
    assert "blocks.1.attn.relative_position_bias_table" in keys
    cls_model = BeitForImageClassification(cfg, num_classes=7, use_mean_pooling=False)
    assert "norm.weight" in cls_model.state_dict() and "fc_norm.weight" not in cls_model.state_dict()
    with pytest.raises(UserError, match="out of range"):
        model.forward_features(x, return_block=3)


def test_from_scratch_init_is_the_original_fine_tuning_models():
    """timm's Beit is built like the original fine-tuning model: the same init statistics per weight."""
    beit = pytest.importorskip("timm.models.beit")
    cfg = make_config("beit_small", img_size=64, patch_size=8, depth=4, **PER_LAYER)
    torch.manual_seed(0)
    ours = BeitForImageClassification(cfg, num_classes=10)
    theirs = beit.Beit(img_size=64, patch_size=8, embed_dim=384, depth=4, num_heads=6, num_classes=10,
                       init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True)
    own = dict(ours.named_parameters())
    assert set(own) == {n for n, _ in theirs.named_parameters()}
    for name, param in theirs.named_parameters():
        if param.std() > 0:
            assert own[name].std().item() == pytest.approx(param.std().item(), rel=0.1), name
        else:
            assert torch.equal(own[name], param), name
    fc1 = ours.blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.02) and fc1.abs().max() > 0.06  # not cut at ±1σ
    assert ours.blocks[3].attn.proj.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    conv = ours.patch_embed.proj  # PyTorch's default: uniform ±1/sqrt(fan_in), a non-zero bias
    assert conv.weight.abs().max() <= (3 * 8 * 8) ** -0.5 and conv.bias.abs().sum() > 0


def test_intermediate_block_features_are_mean_patch_tokens():
    cfg = make_config("beit_tiny", **TINY, **PER_LAYER)
    model = BeitForImageClassification(cfg, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.embed(x)
    for block in model.blocks[:1]:
        tokens = block(tokens)
    torch.testing.assert_close(model.forward_features(x, return_block=1), tokens[:, 1:].mean(1))


def test_shared_table_is_cloned_into_every_layer_and_computes_the_same():
    pre = tiny_pretrained().eval()
    model = BeitForImageClassification(pre.cfg.replace(**PER_LAYER), num_classes=5, use_mean_pooling=False).eval()
    report = load_pretrained(model, pre.state_dict())
    shared = pre.rel_pos_bias.relative_position_bias_table
    for block in model.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table, shared, rtol=0, atol=0)
        assert block.attn.relative_position_bias_table.data_ptr() != shared.data_ptr()
    assert "cloned the shared relative position table into each of the 2 layers" in report.summary()
    assert report.missing == ["head.bias", "head.weight"] and report.unused == []
    assert any("mask_token" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = pre.forward_features(x, torch.zeros(2, 64, dtype=torch.bool))[:, 0]
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-5, atol=1e-5)


def test_mean_pooling_model_reports_the_unused_final_norm():
    pre = tiny_pretrained()
    model = BeitForImageClassification(pre.cfg.replace(**PER_LAYER), num_classes=5)
    report = load_pretrained(model, pre.state_dict())
    assert report.unused == ["norm.bias", "norm.weight"]
    assert {"fc_norm.weight", "head.weight"} <= set(report.missing)


def grid_table(grid: int, heads: int = 2) -> torch.Tensor:
    """A table whose value is a smooth, symmetric function of the offset, plus 3 distinct CLS rows."""
    side = 2 * grid - 1
    d = torch.arange(side, dtype=torch.float32) - (grid - 1)
    dy, dx = torch.meshgrid(d / (grid - 1), d / (grid - 1), indexing="ij")
    values = torch.stack([-(dy**2 + dx**2) + h for h in range(heads)], dim=-1).reshape(side * side, heads)
    return torch.cat((values, torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])[:, :heads]))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_rel_pos_table_resize_keeps_centre_corners_and_cls_rows(mode):
    old = grid_table(8)
    new = resize_rel_pos_table(old, (12, 12), mode)
    assert new.shape == (23 * 23 + 3, 2)
    old_map, new_map = old[:-3].reshape(15, 15, 2), new[:-3].reshape(23, 23, 2)
    torch.testing.assert_close(new_map[11, 11], old_map[7, 7])  # zero offset stays the centre
    torch.testing.assert_close(new_map[0, 0], old_map[0, 0])
    torch.testing.assert_close(new_map[-1, -1], old_map[-1, -1])
    torch.testing.assert_close(new_map, new_map.flip(0).flip(1))  # symmetric structure kept
    assert new_map[11, 11, 0] == new_map[..., 0].max()  # the peak stays at the centre
    torch.testing.assert_close(new[-3:], old[-3:], rtol=0, atol=0)
    assert resize_rel_pos_table(old, (8, 8)) is old


def test_load_pretrained_resizes_tables_and_pos_embed_to_a_larger_image():
    pre = tiny_pretrained(use_abs_pos_emb=True)
    model = BeitForImageClassification(pre.cfg.replace(img_size=48, **PER_LAYER), num_classes=3)
    report = load_pretrained(model, pre.state_dict())
    assert model.blocks[0].attn.relative_position_bias_table.shape == (23 * 23 + 3, 3)
    assert model.pos_embed.shape == (1, 145, 48)
    torch.testing.assert_close(model.pos_embed[:, 0], pre.pos_embed[:, 0])
    torch.testing.assert_close(model.pos_embed.detach(), resize_pos_embed(pre.pos_embed.detach(), (12, 12)))
    shared = pre.rel_pos_bias.relative_position_bias_table.detach()
    expected = resize_rel_pos_table(shared, (12, 12), "geometric")  # the original's scheme is the default
    torch.testing.assert_close(model.blocks[1].attn.relative_position_bias_table.detach(), expected)
    assert sum("resized" in n for n in report.notes) == 3
    assert sum("grid (geometric)" in n for n in report.notes) == 2
    uniform = BeitForImageClassification(pre.cfg.replace(img_size=48, **PER_LAYER), num_classes=3)
    load_pretrained(uniform, pre.state_dict(), rel_pos_interpolation="bicubic")
    bicubic = resize_rel_pos_table(shared, (12, 12), "bicubic")
    torch.testing.assert_close(uniform.blocks[0].attn.relative_position_bias_table.detach(), bicubic)
    assert not torch.allclose(bicubic, expected)
    with pytest.raises(UserError, match="unknown relative position interpolation"):
        load_pretrained(uniform, pre.state_dict(), rel_pos_interpolation="nearest")
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    small = resize_pos_embed(model.pos_embed.detach(), (8, 8))
    assert small.shape == (1, 65, 48)


def test_load_pretrained_drops_a_head_of_another_size_and_refuses_other_widths():
    cfg = make_config("beit_tiny", **TINY, **PER_LAYER)
    donor = BeitForImageClassification(cfg, num_classes=10)
    model = BeitForImageClassification(cfg, num_classes=3)
    report = load_pretrained(model, donor.state_dict())
    assert report.missing == ["head.bias", "head.weight"] and "the model has 3 classes" in report.summary()
    wide = BeitForImageClassification(make_config("beit_tiny", **{**TINY, "embed_dim": 96}, **PER_LAYER), 3)
    with pytest.raises(UserError, match="do not fit"):
        load_pretrained(model, wide.state_dict())


def test_layer_decay_scales_and_no_decay_rule():
    cfg = make_config("beit_tiny", **TINY, **PER_LAYER)
    model = BeitForImageClassification(cfg, num_classes=4)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    num_layers = 2  # scale = 0.65 ** (L + 1 - id)
    assert scale["cls_token"] == pytest.approx(0.65 ** (num_layers + 1))
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.65**3)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65**2)
    assert scale["blocks.1.mlp.fc2.weight"] == pytest.approx(0.65**1)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["cls_token"] == decay["head.bias"] == decay["blocks.0.gamma_1"] == decay["blocks.0.attn.q_bias"] == 0
    assert decay["blocks.0.attn.relative_position_bias_table"] == decay["head.weight"] == 0.05
    assert len(scale) == sum(1 for _ in model.parameters())
    opt = build_adamw(groups, lr=1e-3)
    set_step_values(opt, 2e-3, 0.05)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * 0.65 ** (num_layers + 1 - group["layer_id"]))


def test_topk_correct_clips_k_to_the_class_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    top1, top5 = topk_correct(logits, torch.tensor([1, 2]), (1, 5))
    assert int(top1) == 1 and int(top5) == 2


# ---------------------------------------------------------------------------------------------
# Mixup, cutmix, label smoothing and transforms


def test_label_smoothing_values():
    soft = smooth_one_hot(torch.tensor([2, 0]), num_classes=10, smoothing=0.1)
    assert soft[0, 2] == pytest.approx(0.91) and soft[0, 0] == pytest.approx(0.01)
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    logits = torch.randn(2, 10)
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft),
                               F.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1))


def test_mixup_mixes_images_and_targets_with_one_lambda():
    mix = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, rng=random.Random(0))
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, soft = mix(images, labels)
    lam = float(soft[0, 0])
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, images * lam + images.flip(0) * (1 - lam))
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    torch.testing.assert_close(soft[0, 3], torch.tensor(1 - lam))


def test_cutmix_lambda_is_the_kept_area_and_targets_sum_to_one():
    mix = MixupCutmix(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, rng=random.Random(3))
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 1])
    pasted_any = False
    for _ in range(5):
        mixed, soft = mix(images, labels)
        torch.testing.assert_close(soft.sum(1), torch.ones(6))
        pasted = float((mixed[0] != images[0]).any(0).float().mean())  # image 0 takes a box of image 5
        off = 0.1 / 5
        lam = (float(soft[0, 0]) - off) / (1 - 0.1)  # soft[0, 0] = lam * (0.9 + off) + (1 - lam) * off
        assert pasted == pytest.approx(1 - lam, abs=1e-5)
        pasted_any |= pasted > 0
    assert pasted_any


def test_mixup_switches_and_can_be_off():
    both = MixupCutmix(3, 0.8, 1.0, switch_prob=0.5, rng=random.Random(0))
    kinds = {both.sample()[1] for _ in range(50)}
    assert kinds == {True, False}
    off = MixupCutmix(3, 0.0, 0.0, label_smoothing=0.1)
    assert not off.active
    images = torch.randn(2, 3, 4, 4)
    same, soft = off(images, torch.tensor([0, 2]))
    torch.testing.assert_close(same, images)
    torch.testing.assert_close(soft, smooth_one_hot(torch.tensor([0, 2]), 3, 0.1))


def test_transforms_shapes_and_rand_augment_spec():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    assert build_train_transform(32)(img).shape == (3, 32, 32)
    assert build_eval_transform(32)(img).shape == (3, 32, 32)
    assert [type(t).__name__ for t in build_eval_transform(32).transforms[:2]] == ["Resize", "CenterCrop"]
    assert build_eval_transform(32).transforms[0].size == 36  # 32 / 0.875
    # from 384 px: the short side resized to the size, then a centre crop (never a squash)
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    wide[:, :50, 0] = 255  # a red band on the left that a centre crop removes and a squash keeps
    wide[:, 50:, 2] = 255
    out = build_eval_transform(384)(Image.fromarray(wide))
    assert out.shape == (3, 384, 384) and out[0].max() < 0  # no red left (normalized: -1 where 0)
    assert build_eval_transform(384).transforms[0].size == 384
    # timm's RandAugment with create_transform's hyper-parameters: the original recipe's op set
    aug = parse_auto_augment("rand-m9-mstd0.5-inc1", input_size=32)
    assert aug.num_layers == 2 and len(aug.ops) == 15
    assert {"Invert", "SolarizeAdd", "PosterizeIncreasing", "TranslateXRel"} <= {op.name for op in aug.ops}
    assert all((op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5) for op in aug.ops)
    assert aug.ops[0].hparams["img_mean"] == (128, 128, 128) and aug.ops[0].hparams["translate_const"] == 14
    assert aug(img).size == img.size
    assert parse_auto_augment("none") is None
    with pytest.raises(UserError, match="only RandAugment"):
        parse_auto_augment("v0")
    with pytest.raises(UserError, match="cannot read 'x3'"):
        parse_auto_augment("rand-m9-x3")
    # magnitude 10 (m9 + noise can reach it) asks PosterizeIncreasing for 0 bits: a black image,
    # as with the original's Pillow, not Pillow 12+'s ValueError
    strongest = parse_auto_augment("rand-m10-mstd0-inc1", input_size=32)
    posterize_op = next(op for op in strongest.ops if op.name == "PosterizeIncreasing")
    posterize_op.prob = 1.0
    assert np.asarray(posterize_op(img)).max() == 0
    weaker = next(op for op in parse_auto_augment("rand-m5-mstd0-inc1", input_size=32).ops
                  if op.name == "PosterizeIncreasing")
    weaker.prob = 1.0
    assert np.array_equal(np.asarray(weaker(img)), np.asarray(img) & 0xC0)  # m5: 4 - int(5 / 10 * 4) = 2 bits


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    data = make_class_folders(base / "data")
    pre = tiny_pretrained()
    ckpt = base / "pretrain.pt"
    torch.save({"model": pre.state_dict(), "config": pre.cfg.to_dict(), "args": {}}, ckpt)
    return base, data, ckpt


def cli_args(data: Path, out: Path, *extra: str, model: bool = True) -> list:
    """Tiny settings; ``model=False`` leaves the size to the checkpoint."""
    return ["--data", str(data), *(["--model", "beit_tiny"] if model else []), "--depth", "2",
            "--input_size", "32", "--patch_size", "4",
            "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--amp", "none",
            "--output", str(out), "--no_progress", "--log_every", "1", *extra]


def test_finetune_from_a_pretraining_checkpoint_writes_everything(folders, tmp_path, capsys):
    base, data, ckpt = folders
    assert finetune.main(cli_args(data, tmp_path, "--finetune", str(ckpt), model=False)) == 0
    out = capsys.readouterr().out
    assert "fastbeit pre-training checkpoint" in out and "cloned the shared relative position table" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 18 images / batch 4
    epoch = [r for r in records if "acc1" in r]
    assert len(epoch) == 1 and 0 <= epoch[0]["acc1"] <= 100 and epoch[0]["acc5"] == 100.0  # 3 classes
    assert epoch[0]["val_images"] == 6
    assert (tmp_path / "curves.png").stat().st_size > 1000
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["kind"] == "classifier" and best["classes"] == ["cat", "dog", "fox"] and "optimizer" not in best
    assert last["global_step"] == 4 and last["epoch"] == 1 and "optimizer" in last
    model = BeitForImageClassification(make_config("beit_tiny", **{**TINY, **PER_LAYER}), 3)
    model.load_state_dict(best["model"])

    assert finetune.main(cli_args(data, tmp_path / "eval", "--resume", str(tmp_path / "best.pt"), "--eval")) == 0
    assert f"top-1 {epoch[0]['acc1']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("mode", [None, "bicubic"])
def test_finetune_at_a_larger_size_resizes_tables_geometrically_by_default(folders, tmp_path, mode):
    base, data, ckpt = folders
    extra = ["--rel_pos_interpolation", mode] if mode else []
    trainer, args = finetune.build_trainer(cli_args(data, tmp_path, "--finetune", str(ckpt), "--input_size", "48",
                                                    *extra, model=False))
    assert args.rel_pos_interpolation == (mode or "geometric")
    shared = torch.load(ckpt, weights_only=True)["model"]["rel_pos_bias.relative_position_bias_table"]
    expected = resize_rel_pos_table(shared, (12, 12), mode or "geometric")
    torch.testing.assert_close(trainer.model.blocks[1].attn.relative_position_bias_table.detach(), expected)
    assert f"from a 8x8 to a 12x12 grid ({mode or 'geometric'})" in trainer.load_report.summary()


def test_learning_rate_is_scaled_from_the_recipe_and_layer_decay_applied(folders, tmp_path):
    base, data, ckpt = folders
    trainer, _ = finetune.build_trainer(cli_args(data, tmp_path, "--update_freq", "2"))
    assert trainer.lr == pytest.approx(4e-3 * 8 / 1024)
    assert trainer.steps_per_epoch == 2
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert scales == pytest.approx([0.65**3, 0.65**2, 0.65, 1.0])


def test_warmup_starts_at_zero_and_rel_pos_tables_can_skip_weight_decay(folders, tmp_path):
    base, data, ckpt = folders
    trainer, _ = finetune.build_trainer(cli_args(data, tmp_path, "--warmup_epochs", "1", "--warmup_lr", "1e-3",
                                                 "--disable_weight_decay_on_rel_pos_bias", "--rel_pos_bias"))
    assert trainer.lr_schedule[0] == 0.0  # the original parses --warmup_lr but starts at 0
    tables = {id(p) for n, p in trainer.model.named_parameters() if n.endswith("relative_position_bias_table")}
    decays = [g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"] if id(p) in tables]
    assert decays == [0.0, 0.0]  # one table per layer, none decayed (the original decays them by default)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(folders, tmp_path, amp):
    base, data, ckpt = folders
    args = cli_args(data, tmp_path)
    args[args.index("--amp") + 1] = amp
    assert finetune.main(args) == 0
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (last["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_eval_of_a_fine_tuned_checkpoint_given_as_finetune(folders, tmp_path, capsys):
    base, data, ckpt = folders
    assert finetune.main(cli_args(data, tmp_path / "run", "--finetune", str(ckpt), model=False)) == 0
    capsys.readouterr()
    args = cli_args(data, tmp_path / "eval", "--finetune", str(tmp_path / "run" / "best.pt"), "--eval", model=False)
    args[args.index("--input_size"):args.index("--input_size") + 2] = []  # default: the checkpoint's 32 px
    assert finetune.main(args) == 0
    assert "top-1" in capsys.readouterr().out and not (tmp_path / "eval" / "metrics.jsonl").exists()


def test_ctrl_c_saves_and_resume_finishes(folders, tmp_path, monkeypatch, capsys):
    base, data, ckpt = folders
    real = interrupt_on_call(monkeypatch, finetune.FineTuner, "optimizer_step", 3)
    assert finetune.main(cli_args(data, tmp_path, "--epochs", "2")) == 130
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["reason"] == "interrupted" and last["global_step"] == 2 and last["step_in_epoch"] == 2
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(finetune.FineTuner, "optimizer_step", real)
    assert finetune.main(cli_args(data, tmp_path, "--epochs", "2", "--resume", "auto")) == 0
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["global_step"] == 8 and last["epoch"] == 2


def test_finetune_from_a_real_pretrain_run(folders, tmp_path):
    """A checkpoint written by the fastbeit.pretrain CLI (one tiny epoch) fine-tunes."""
    from fastbeit import pretrain
    from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig, save_tokenizer

    base, data, _ = folders
    torch.manual_seed(0)
    tok = save_tokenizer(DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64)),
                         tmp_path / "tok.safetensors")
    pre_out = tmp_path / "pre"
    assert pretrain.main(["--data", str(data / "train"), "--model", "beit_tiny", "--input_size", "32",
                          "--patch_size", "4", "--second_input_size", "64", "--tokenizer", str(tok),
                          "--batch_size", "6", "--epochs", "1", "--num_workers", "0", "--num_mask_patches", "20",
                          "--min_mask_patches_per_block", "4", "--output", str(pre_out), "--no_progress",
                          "--amp", "none", "--warmup_epochs", "0", "--max_steps", "1", "--kernels", "reference",
                          "--attn", "sdpa"]) == 0
    args = cli_args(data, tmp_path / "ft", "--finetune", str(pre_out / "checkpoint.pt"), "--depth", "12")
    assert finetune.main(args) == 0
    assert (tmp_path / "ft" / "best.pt").is_file()


def test_imagenette_layout_works(shared_data, tmp_path):
    """A small copy (links) of the shared Imagenette train/val folders: real JPEGs, greyscale included."""
    src = shared_data / "imagenette"
    for split, count in (("train", 2), ("val", 1)):
        for folder in sorted((src / split).iterdir()):
            dst = tmp_path / "data" / split / folder.name
            dst.mkdir(parents=True)
            for f in sorted(folder.iterdir())[:count]:
                (dst / f.name).symlink_to(f)
    args = cli_args(tmp_path / "data", tmp_path / "out", "--depth", "1")
    assert finetune.main(args) == 0
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    assert len(best["classes"]) == 10 and best["num_classes"] == 10


def run_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        finetune.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_class_folder_mismatch_names_the_classes(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data")
    (data / "val" / "fox").rename(data / "val" / "wolf")
    err = run_error(cli_args(data, tmp_path / "out"), capsys)
    assert "only in train ['fox']" in err and "only in val ['wolf']" in err


def test_wrong_checkpoints_are_refused_clearly(folders, tmp_path, capsys):
    base, data, ckpt = folders
    err = run_error(cli_args(data, tmp_path, "--finetune", str(ckpt), "--model", "beit_small"), capsys)
    assert "embed_dim 48 (expected 384)" in err and "beit_small" in err
    torch.save({"encoder.blocks.0.weight": torch.zeros(2), "decoder.x": torch.zeros(1)}, tmp_path / "tok.pt")
    err = run_error(cli_args(data, tmp_path, "--finetune", str(tmp_path / "tok.pt")), capsys)
    assert "not a BEiT checkpoint" in err and "tokenizer" in err
    torch.save({"kind": "segmentation", "model": {"backbone.cls_token": torch.zeros(1)}, "config": {}},
               tmp_path / "seg.pt")
    err = run_error(cli_args(data, tmp_path, "--finetune", str(tmp_path / "seg.pt")), capsys)
    assert f"{tmp_path / 'seg.pt'} is not a BEiT checkpoint" in err and "segmentation checkpoint" in err
    sd = torch.load(ckpt, weights_only=True)
    del sd["model"]["blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    err = run_error(cli_args(data, tmp_path, "--finetune", str(tmp_path / "partial.pt"), model=False), capsys)
    assert "partial.pt" in err and "missing: blocks.1.mlp.fc2.weight" in err  # not "newly initialized"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in run_error(cli_args(data, tmp_path, "--finetune", str(tmp_path / "junk.pt")),
                                                    capsys)
    assert "does not exist" in run_error(cli_args(data, tmp_path, "--finetune", str(tmp_path / "no.pt")), capsys)
    err = run_error(cli_args(data, tmp_path, "--finetune", str(ckpt), "--eval", model=False), capsys)
    assert "needs a fine-tuned classifier" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--nb_classes", "2"], "--nb_classes 2 is too small"),
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--batch_size", "64"], "no full step"),
        (["--aa", "v0"], "only RandAugment"),
    ],
)
def test_user_mistakes_get_one_clear_line(folders, tmp_path, capsys, extra, message):
    base, data, ckpt = folders
    assert message in run_error(cli_args(data, tmp_path, *extra), capsys)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(folders, tmp_path):
    base, data, ckpt = folders
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "fastbeit.finetune", *cli_args(data, tmp_path, "--batch_size", "3")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # 18 images / (2 ranks x batch 3)
    assert [r["val_images"] for r in records if "acc1" in r] == [6]
