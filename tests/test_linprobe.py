"""The linear probe end to end: features of one block, the cache, the probe head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbeit import linprobe
from fastbeit.config import make_config
from fastbeit.model import BeitForMaskedImageModeling

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, vocab_size=97, drop_path_rate=0.0)




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("linprobe")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for c, name in enumerate(("red", "green")):
            folder = base / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8)
                pixels[..., c] += 190
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(make_config("beit_tiny", **TINY))
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, base / "pre.pt")
    return base


def args_for(base: Path, out: Path, *extra: str) -> list:
    return ["--checkpoint", str(base / "pre.pt"), "--data", str(base / "data"), "--output", str(out),
            "--cache", str(base / "cache"), "--epochs", "30", "--batch_size", "8", "--num_workers", "0",
            "--amp", "none", "--no_progress", *extra]


def test_probe_end_to_end_and_cache_reused(setup, tmp_path, capsys, monkeypatch):
    assert linprobe.main(args_for(setup, tmp_path / "a")) == 0
    first = capsys.readouterr().out
    assert "cached features in" in first and "block 3" in first  # default: 3/4 of depth 4
    records = [json.loads(line) for line in (tmp_path / "a" / "linprobe.jsonl").read_text().splitlines()]
    assert len(records) == 30 and records[-1]["acc1"] == 100.0  # two colours are linearly separable
    probe = torch.load(tmp_path / "a" / "probe.pt", weights_only=True)
    assert probe["block"] == 3 and probe["classes"] == ["green", "red"]
    assert (tmp_path / "a" / "curves.png").is_file()

    def no_extraction(*args, **kwargs):
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(linprobe, "extract", no_extraction)
    assert linprobe.main(args_for(setup, tmp_path / "b", "--opt", "adamw")) == 0
    second = capsys.readouterr().out
    assert "using cached features" in second and "cached features" in second.splitlines()[-1]


def test_other_block_gets_its_own_cache_entry(setup, tmp_path, capsys):
    cache = tmp_path / "cache"
    for block in ("1", "2"):
        assert linprobe.main(args_for(setup, tmp_path, "--block", block, "--epochs", "2", "--cache", str(cache))) == 0
        assert "cached features in" in capsys.readouterr().out
    files = sorted(cache.glob("features-*.pt"))
    assert len(files) == 2
    blocks = {torch.load(f, weights_only=True)["block"] for f in files}
    assert blocks == {1, 2}


def test_features_are_the_block_average(setup):
    from fastbeit.interchange import load_any

    loaded = load_any(setup / "pre.pt")
    args = linprobe.resolve_args(args_for(setup, setup / "x"))
    encoder, summary = linprobe.frozen_encoder(loaded, args)
    assert "dropped pre-training-only" in summary
    pre = BeitForMaskedImageModeling(make_config("beit_tiny", **TINY)).eval()
    pre.load_state_dict(loaded.state_dict)
    x = torch.randn(2, 3, 32, 32)
    tokens = pre.cls_token.expand(2, -1, -1)
    with torch.no_grad():
        h = torch.cat((tokens, pre.patch_embed(x)), dim=1)
        bias = pre.rel_pos_bias()
        for block in pre.blocks[:2]:
            h = block(h, bias)
        torch.testing.assert_close(encoder.forward_features(x, return_block=2), h[:, 1:].mean(1))


def test_block_out_of_range_is_one_clear_line(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        linprobe.main(args_for(setup, tmp_path, "--block", "9"))
    assert exc.value.code == 2
    assert "--block 9 is out of range" in capsys.readouterr().err


def test_a_checkpoint_without_a_head_count_needs_num_heads(setup, tmp_path, capsys):
    """No relative position table and no config: the head count is asked for, never guessed."""
    from fastbeit.config import PLAIN_VIT

    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(make_config("beit_tiny", **{**TINY, **PLAIN_VIT}))
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    argv = args_for(setup, tmp_path / "out", "--epochs", "2")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "bare.pt")
    with pytest.raises(SystemExit) as exc:
        linprobe.main(argv)
    assert exc.value.code == 2 and "give it with --num_heads" in capsys.readouterr().err
    assert linprobe.main([*argv, "--num_heads", "3"]) == 0
    assert "3 heads" in capsys.readouterr().out
