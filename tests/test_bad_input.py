"""A user's mistake on any CLI is one ``error:`` line (exit status != 0, no traceback) before any work."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from fastbeit import finetune, interchange, linprobe, pretrain, report, segment, visualize
from fastbeit.errors import UserError
from fastbeit.experiments import reproduce
from fastbeit.tokenizer import __main__ as tokenizer_cli
from fastbeit.tokenizer import train as tokenizer_train
from fastbeit.validate import resolve_device

# "{file}" becomes an existing file, "{dir}" an existing folder, "{img}" a readable image.
COMMON = {
    pretrain: [],
    finetune: ["--data", "{dir}"],
    linprobe: ["--checkpoint", "{file}", "--data", "{dir}"],
    segment: ["--data", "{dir}"],
    tokenizer_train: ["--data", "{dir}", "--output", "{dir}/out"],
    visualize: ["attention", "--checkpoint", "{file}", "--image", "{img}", "--output", "{dir}/a.png"],
    interchange: ["--to", "timm"],
    report: [],
    tokenizer_cli: ["{img}"],
    reproduce: ["--data", "{dir}"],
}

CASES = [
    (pretrain, "--lr -1", "--lr"),
    (pretrain, "--lr nan", "--lr"),
    (pretrain, "--num_workers -1", "--num_workers"),
    (pretrain, "--log_every 0", "--log_every"),
    (pretrain, "--save_ckpt_freq 0", "--save_ckpt_freq"),
    (pretrain, "--patch_size 0", "--patch_size"),
    (pretrain, "--depth -1", "--depth"),
    (pretrain, "--depth 0", "--depth"),
    (pretrain, "--opt_betas 2 2", "--opt_betas"),
    (pretrain, "--train_interpolation cubic", "--train_interpolation"),
    (pretrain, "--device tpu", "--device"),
    (pretrain, "--clip_grad -1", "--clip_grad"),
    (pretrain, "--weight_decay -0.05", "--weight_decay"),
    (pretrain, "--color_jitter -0.4", "--color_jitter"),
    (pretrain, "--max_steps 0", "--max_steps"),
    (pretrain, "--output {file}", "is a file"),
    (finetune, "--lr nan", "--lr"),
    (finetune, "--num_workers -1", "--num_workers"),
    (finetune, "--log_every 0", "--log_every"),
    (finetune, "--save_ckpt_freq 0", "--save_ckpt_freq"),
    (finetune, "--patch_size 0", "--patch_size"),
    (finetune, "--depth 0", "--depth"),
    (finetune, "--opt_betas 0.9 1", "--opt_betas"),
    (finetune, "--train_interpolation cubic", "--train_interpolation"),
    (finetune, "--device tpu", "--device"),
    (finetune, "--crop_pct 0", "--crop_pct"),
    (finetune, "--clip_grad -1", "--clip_grad"),
    (finetune, "--weight_decay -1", "--weight_decay"),
    (finetune, "--mixup -0.8", "--mixup"),
    (finetune, "--cutmix -1", "--cutmix"),
    (finetune, "--smoothing 1", "--smoothing"),
    (finetune, "--smoothing -0.1", "--smoothing"),
    (finetune, "--layer_decay 0", "--layer_decay"),
    (finetune, "--layer_decay 1.5", "--layer_decay"),
    (finetune, "--output {file}", "is a file"),
    (linprobe, "--extract_batch_size 0", "--extract_batch_size"),
    (linprobe, "--num_workers -1", "--num_workers"),
    (linprobe, "--lr -0.1", "--lr"),
    (linprobe, "--weight_decay -1", "--weight_decay"),
    (linprobe, "--device tpu", "--device"),
    (linprobe, "--output {file}", "is a file"),
    (segment, "--lr nan", "--lr"),
    (segment, "--num_workers -1", "--num_workers"),
    (segment, "--log_every 0", "--log_every"),
    (segment, "--patch_size 0", "--patch_size"),
    (segment, "--depth -1", "--depth"),
    (segment, "--opt_betas 2 2", "--opt_betas"),
    (segment, "--layer_decay 0", "--layer_decay"),
    (segment, "--clip_grad -1", "--clip_grad"),
    (segment, "--weight_decay -1", "--weight_decay"),
    (segment, "--max_steps 0", "--max_steps"),
    (segment, "--device tpu", "--device"),
    (segment, "--output {file}", "is a file"),
    (tokenizer_train, "--lr nan", "--lr"),
    (tokenizer_train, "--num-workers -1", "--num-workers"),
    (tokenizer_train, "--log-every 0", "--log-every"),
    (tokenizer_train, "--weight-decay -1", "--weight-decay"),
    (tokenizer_train, "--device tpu", "--device"),
    (tokenizer_train, "--output {file}", "is a file"),
    (tokenizer_train, "--resume {file}", "not a torch checkpoint"),
    (pretrain, "--resume {file}", "not a torch checkpoint"),
    (visualize, "--device tpu", "--device"),
    (visualize, "--output {dir}", "is a folder"),
    (interchange, "{file} {dir}", "is a folder"),
    (report, "--device tpu", "--device"),
    (report, "--output {file}", "is a file"),
    (tokenizer_cli, "--output {dir}", "is a folder"),
    (reproduce, "--num_workers -1", "--num_workers"),
    (reproduce, "--output {file}", "is a file"),
]


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) land here
    (tmp_path / "file").write_bytes(b"not a checkpoint")
    (tmp_path / "dir").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    return {"file": str(tmp_path / "file"), "dir": str(tmp_path / "dir"), "img": str(tmp_path / "img.png")}


def run_cli(module, argv, capsys) -> str:
    """``module.main(argv)`` must stop with one ``error:`` line; returns that line."""
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def fill(words, places):
    return [w.format(**places) for w in words]


@pytest.mark.parametrize("module, bad, expected", CASES,
                         ids=[f"{m.__name__.split('.')[-1]} {bad}" for m, bad, _ in CASES])
def test_bad_flag_is_one_error_line(module, bad, expected, places, capsys):
    line = run_cli(module, fill(COMMON[module] + bad.split(), places), capsys)
    assert expected.format(**places) in line


def test_unwritable_output_is_refused(places, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only disk (root passes chmod)
    line = run_cli(pretrain, ["--output", places["dir"] + "/run"], capsys)
    assert "cannot write" in line
    line = run_cli(interchange, fill(["{file}", "{dir}/x.pt", "--to", "timm"], places), capsys)
    assert "cannot write" in line


def test_device_names(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(UserError, match="not a device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("module", [tokenizer_cli, visualize])
def test_decompression_bomb_is_one_error_line(module, places, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 image is > 2x the limit: PIL's error case
    line = run_cli(module, fill(COMMON[module], places), capsys)
    assert "too large" in line


def test_all_corrupt_folder_read_by_workers_is_one_error_line(tmp_path, capsys):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    argv = ["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--num-workers", "1", "--batch-size", "2",
            "--n-hid", "4", "--vocab-size", "8", "--image-size", "16", "--epochs", "1", "--device", "cpu"]
    line = run_cli(tokenizer_train, argv, capsys)
    assert line.startswith("error: none of the 4 images") and "DataLoader worker" not in line


def test_a_large_image_below_the_bomb_error_is_read_with_one_note(places, capsys, monkeypatch):
    from fastbeit.data.folder import read_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 32x32 = 1024: PIL warns, below its 2x error size
    assert read_image(places["img"]).size == (32, 32)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "very large" in err


def test_fastbeit_warnings_print_as_one_line():
    import warnings

    from fastbeit.errors import one_line_warnings

    ours = os.path.join(os.sep, "x", "fastbeit", "data", "folder.py")
    with one_line_warnings():
        assert warnings.formatwarning("skipping a.jpg", UserWarning, ours, 9) == "warning: skipping a.jpg\n"
        assert "torch" in warnings.formatwarning("other", UserWarning, "/x/torch/y.py", 9)
