"""The small-scale reproduction runs end to end (CPU scale, tiny data) and writes its table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastbeit.experiments import reproduce
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig, save_tokenizer


@pytest.fixture
def class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                base = 60 if cls == "a" else 190
                pixels = np.clip(rng.normal(base, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    tok = save_tokenizer(DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64)),
                         tmp_path / "tok.safetensors")
    return tmp_path / "data", tok


def test_cpu_reproduction_writes_the_table(class_folders, tmp_path, capsys):
    data, tok = class_folders
    out = tmp_path / "out"
    argv = ["--data", str(data), "--output", str(out), "--tokenizer", str(tok), "--variants", "1,3,5",
            "--amp", "none"]
    assert reproduce.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {reproduce.VARIANTS[i].name for i in (0, 2, 4)}
    assert all(0 <= acc <= 100 for acc in results.values())
    table = (out / "table.md").read_text()
    assert "82.86" in table and "from scratch" in table and (out / "table.png").stat().st_size > 1000
    # a second run reuses what was measured
    assert reproduce.main(argv) == 0
    assert "already measured" in capsys.readouterr().out


def test_bad_data_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--data", str(tmp_path)])
    assert "train/ and val/" in capsys.readouterr().err


def test_run_flags_reach_both_stages_and_scratch_has_no_layer_decay(tmp_path):
    run = reproduce.build_parser().parse_args(["--data", "d", "--attn", "sdpa", "--kernels", "reference",
                                               "--num_workers", "3", "--amp", "none"])
    scale = dict(reproduce.SCALES["gpu"])
    pre = reproduce.pretrain_args(reproduce.VARIANTS[2], scale, tmp_path, tmp_path / "p", run)
    scratch = reproduce.finetune_args(scale, tmp_path, tmp_path, tmp_path / "f", run, None)
    tuned = reproduce.finetune_args(scale, tmp_path, tmp_path, tmp_path / "f", run, tmp_path / "ckpt.pt")
    for args in (pre, scratch, tuned):
        assert args[args.index("--attn") + 1] == "sdpa" and args[args.index("--kernels") + 1] == "reference"
        assert args[args.index("--num_workers") + 1] == "3" and args[args.index("--amp") + 1] == "none"
    assert pre[pre.index("--target") + 1] == "pixels" and pre[pre.index("--second_input_size") + 1] == "112"
    assert scratch[scratch.index("--layer_decay") + 1] == "1.0" and "--finetune" not in scratch
    assert "--layer_decay" not in tuned and tuned[tuned.index("--finetune") + 1].endswith("ckpt.pt")


def test_bad_epoch_override_is_a_clear_error(class_folders, tmp_path, capsys):
    data, _ = class_folders
    with pytest.raises(SystemExit):
        reproduce.main(["--data", str(data), "--output", str(tmp_path / "o"), "--pretrain_epochs", "0"])
    assert "--pretrain_epochs must be positive" in capsys.readouterr().err
