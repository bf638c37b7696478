"""The pre-training CLI end to end on tiny settings: outputs, resume, interrupts, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from PIL import Image

from fastbeit import pretrain
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain")
    data = base / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = data / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((96, 80)).save(folder / f"img{i}.jpg")
    torch.manual_seed(0)
    tok = DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64))
    tok_path = save_tokenizer(tok, base / "tok.safetensors")
    return base, data, tok_path


def tiny_args(setup, out, *extra):
    base, data, tok = setup
    return [
        "--data", str(data), "--model", "beit_tiny", "--input_size", "32", "--patch_size", "4",
        "--second_input_size", "64", "--tokenizer", str(tok), "--batch_size", "4", "--epochs", "2",
        "--num_workers", "0", "--num_mask_patches", "20", "--min_mask_patches_per_block", "4",
        "--output", str(out), "--no_progress", "--log_every", "1", "--amp", "none", "--warmup_epochs", "1",
        *extra,
    ]


def final_weights(out: Path):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_run_writes_checkpoint_metrics_and_plot(tiny_setup, tmp_path, capsys):
    assert pretrain.main(tiny_args(tiny_setup, tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # 12 images / batch 4 = 3 steps a epoch
    assert all(np.isfinite(r["loss"]) and 0 <= r["mlm_acc"] <= 1 for r in records)
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1.5e-3)  # warmup from 0
    assert {"grad_norm", "img_per_s", "wd"} <= records[0].keys()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 2
    assert "loss" in capsys.readouterr().out


def test_resume_continues_exactly(tiny_setup, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain.main(tiny_args(tiny_setup, straight)) == 0
    assert pretrain.main(tiny_args(tiny_setup, split, "--max_steps", "3")) == 0
    assert torch.load(split / "checkpoint.pt", weights_only=True)["global_step"] == 3
    assert pretrain.main(tiny_args(tiny_setup, split, "--resume", "auto")) == 0
    a, b = final_weights(straight), final_weights(split)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def interrupt_on_step(monkeypatch, call: int, interrupt) -> None:
    """Run ``interrupt()`` at the start of the ``call``-th training step (1-based)."""
    real_step, calls = pretrain.Trainer.step, {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            interrupt()
        return real_step(self, batch)

    monkeypatch.setattr(pretrain.Trainer, "step", step)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_first(tiny_setup, tmp_path, monkeypatch, capsys):
    real_step = pretrain.Trainer.step
    interrupt_on_step(monkeypatch, 2, raise_keyboard_interrupt)
    assert pretrain.main(tiny_args(tiny_setup, tmp_path)) == 130
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["reason"] == "interrupted" and ckpt["global_step"] == 1 and ckpt["step_in_epoch"] == 1
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(pretrain.Trainer, "step", real_step)
    assert pretrain.main(tiny_args(tiny_setup, tmp_path, "--resume", str(tmp_path / "checkpoint.pt"))) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 6


def test_sigterm_is_handled_like_ctrl_c(tiny_setup, tmp_path, monkeypatch, capsys):
    """Schedulers and ``timeout`` send SIGTERM before killing: the run saves first, as on Ctrl-C."""
    interrupt_on_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert pretrain.main(tiny_args(tiny_setup, tmp_path)) == 130
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["reason"] == "interrupted" and ckpt["global_step"] == 3  # the signalled step finished first
    assert "--resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch, capsys):
    real_step = pretrain.Trainer.step

    def exploding(self, batch):
        stats = real_step(self, batch)
        if self.global_step >= 4:
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(pretrain.Trainer, "step", exploding)
    assert pretrain.main(tiny_args(tiny_setup, tmp_path)) == 3
    assert "non-finite loss" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tiny_setup, tmp_path, amp):
    args = tiny_args(tiny_setup, tmp_path, "--max_steps", "2")
    args[args.index("--amp") + 1] = amp
    assert pretrain.main(args) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--data": "/nonexistent/folder"}, "does not exist"),
        ({"--model": "beit_gigantic"}, "unknown model"),
        ({"--batch_size": "64"}, "no full batch"),
        ({"--input_size": "30"}, "not divisible"),
        ({"--second_input_size": "48"}, "second_input_size must be 64"),
        ({"--num_mask_patches": "100"}, "bad masking settings"),
        ({"--tokenizer": "/nonexistent/tok.safetensors"}, "not found"),
    ],
)
def test_user_mistakes_get_one_clear_line(tiny_setup, tmp_path, change, message, capsys):
    args = tiny_args(tiny_setup, tmp_path)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exc:
        pretrain.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# The BEiT README's ImageNet-1k pre-training command (run_beit_pretraining.py), flags verbatim.
ORIGINAL_COMMAND = (
    "--data_path {data} --output_dir {out} --num_mask_patches 75 --model beit_base_patch16_224_8k_vocab "
    "--discrete_vae_weight_path {tok} --batch_size 128 --lr 1.5e-3 --warmup_epochs 10 --epochs 800 "
    "--clip_grad 3.0 --drop_path 0.1 --layer_scale_init_value 0.1 --imagenet_default_mean_and_std"
)


def original_config(argv, monkeypatch):
    """The config ``build_model`` gives for ``argv`` (without building BEiT-Base's weights)."""
    args = pretrain.resolve_args(argv)
    monkeypatch.setattr(pretrain, "BeitForMaskedImageModeling", lambda cfg: cfg)
    return args, pretrain.build_model(args, 8192)


def test_the_original_command_line_builds_the_original_model(tiny_setup, tmp_path, monkeypatch):
    base, data, _ = tiny_setup
    argv = ORIGINAL_COMMAND.format(data=data, out=tmp_path, tok=base).split()
    args, cfg = original_config(argv, monkeypatch)
    assert (args.batch_size, args.lr, args.warmup_epochs, args.epochs, args.clip_grad) == (128, 1.5e-3, 10, 800, 3)
    assert args.num_mask_patches == 75 and args.imagenet_default_mean_and_std and args.output == str(tmp_path)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.vocab_size, cfg.img_size, cfg.patch_size) == (
        768, 12, 12, 8192, 224, 16)
    assert cfg.use_shared_rel_pos_bias and not cfg.use_rel_pos_bias and not cfg.use_abs_pos_emb
    assert (cfg.init_values, cfg.drop_path_rate, cfg.layer_norm_eps, cfg.qkv_bias) == (0.1, 0.1, 1e-6, True)
    # --rel_pos_bias is the original's shared table (a no-op), --disable_rel_pos_bias removes all bias
    assert original_config(argv + ["--rel_pos_bias"], monkeypatch)[1] == cfg
    none = original_config(argv + ["--disable_rel_pos_bias"], monkeypatch)[1]
    assert not none.use_shared_rel_pos_bias and not none.use_rel_pos_bias
    per_layer = original_config(argv + ["--per_layer_rel_pos_bias"], monkeypatch)[1]
    assert per_layer.use_rel_pos_bias and not per_layer.use_shared_rel_pos_bias
    # the original's tokenizer folder: its encoder.pkl is what is loaded
    seen = []
    monkeypatch.setattr("fastbeit.tokenizer.dvae.load_tokenizer", lambda path: seen.append(path) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pretrain.build_tokenizer(args.tokenizer, torch.device("cpu"))
    assert seen == [str(base / "encoder.pkl")]


def test_rel_pos_table_can_be_kept_out_of_weight_decay(tiny_setup, tmp_path):
    args = pretrain.resolve_args(tiny_args(tiny_setup, tmp_path, "--disable_weight_decay_on_rel_pos_bias"))
    trainer = pretrain.Trainer(args)
    table = trainer.model.rel_pos_bias.relative_position_bias_table
    group = next(g for g in trainer.optimizer.param_groups if any(p is table for p in g["params"]))
    assert group["weight_decay"] == 0.0  # decayed by default, as in the original


def test_empty_data_folder(tiny_setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = tiny_args(tiny_setup, tmp_path / "out")
    args[args.index("--data") + 1] = str(tmp_path / "empty")
    with pytest.raises(SystemExit):
        pretrain.main(args)
    assert "no images found" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(tiny_setup, tmp_path, capsys):
    assert pretrain.main(tiny_args(tiny_setup, tmp_path, "--max_steps", "1")) == 0
    args = tiny_args(tiny_setup, tmp_path, "--resume", "auto", "--model", "beit_small")
    args.remove("--model"), args.remove("beit_tiny")
    with pytest.raises(SystemExit):
        pretrain.main(args)
    assert "another model" in capsys.readouterr().err


def test_ddp_on_two_cpu_processes(tiny_setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "fastbeit.pretrain", *tiny_args(tiny_setup, tmp_path, "--batch_size", "2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 12 images over 2 ranks x batch 2 = 3 steps an epoch, logged once (rank 0) per step
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_ddp_with_compile_on_two_cpu_processes_matches_eager_ddp(tiny_setup, tmp_path):
    """torch.compile wraps DDP (dynamo splits the graph at DDP's gradient buckets): the compiled
    2-process run logs the eager 2-process run's losses."""
    def run(out, *extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
               "-m", "fastbeit.pretrain", *tiny_args(tiny_setup, out, "--batch_size", "2", "--max_steps", "3"),
               *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return proc.stdout + proc.stderr, [json.loads(line)["loss"] for line in lines]

    log, compiled = run(tmp_path / "compiled", "--compile")
    assert "compiled the step in" in log and "running it eagerly" not in log, log[-2000:]
    _, eager = run(tmp_path / "eager", "--no-compile")
    assert len(compiled) == len(eager) == 3
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_out_of_the_box_demo_starts(tmp_path):
    """The README's main job on the shipped sample and tokenizer (two steps here)."""
    code = pretrain.main(["--amp", "bf16", "--max_steps", "2", "--output", str(tmp_path), "--no_progress",
                          "--num_workers", "0", "--batch_size", "4"])
    assert code == 0 and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.extras
def test_dali_loader_in_cpu_mode_trains(tiny_setup, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    args = tiny_args(tiny_setup, tmp_path, "--loader", "dali", "--max_steps", "2", "--num_workers", "1")
    assert pretrain.main(args) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 2


def test_gpu_mask_sampler_path_trains(tiny_setup, tmp_path):
    """--mask_sampler gpu runs the Triton sampler (interpreted on CPU in tests); the loader ships no masks."""
    args = tiny_args(tiny_setup, tmp_path, "--mask_sampler", "gpu", "--mask_mode", "exact", "--max_steps", "2")
    assert pretrain.main(args) == 0


def test_pixel_regression_target(tiny_setup, tmp_path):
    """The paper's ablation: no tokenizer, the head regresses the masked patches' pixels."""
    args = tiny_args(tiny_setup, tmp_path, "--target", "pixels", "--max_steps", "3")
    assert pretrain.main(args) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model"]["lm_head.weight"].shape == (3 * 4 * 4, 192)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)


def test_patchify_follows_token_order():
    from fastbeit.model import patchify

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; its first pixel (row 0, col 4) of every channel
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 4].item() for c in range(3)]
    conv_order = images.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 2, 2, 4, 4]
    assert torch.equal(patches[1, 3].reshape(4, 4, 3).permute(2, 0, 1), conv_order[1, :, 1, 1])


def test_pixel_loss_is_the_mean_over_the_masked_patches_and_nan_past_max_masked():
    """The padded gather equals the boolean one; an image with more masked patches than rows is NaN."""
    from fastbeit.model import create_model, patchify

    torch.manual_seed(0)
    model = create_model("beit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                         vocab_size=48).eval()
    images = torch.randn(3, 3, 16, 16)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[1, [0, 2, 3, 9, 15]] = True
    masks[2, [7]] = True
    x = model.forward_features(images, masks)[:, 1:]
    expected = (model.lm_head(x[masks]) - patchify(images, 4)[masks]).pow(2).mean()
    torch.testing.assert_close(model.forward_pixel_loss(images, masks, 5).loss, expected)
    assert torch.isnan(model.forward_pixel_loss(images, masks, 4).loss)  # image 1 has 5 > 4
