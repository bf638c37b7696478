"""The dVAE tokenizer: shapes, DALL-E weight loading, files, and the training CLI (all tiny)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import interrupt_on_call
from PIL import Image

from fastbeit.errors import UserError
from fastbeit.tokenizer import (
    DEFAULT_TOKENIZER,
    DiscreteVAE,
    DVAEConfig,
    load_dalle_encoder,
    load_tokenizer,
    save_tokenizer,
)
from fastbeit.tokenizer.__main__ import main as look_main
from fastbeit.tokenizer.dvae import GumbelNoisePool
from fastbeit.tokenizer.train import Schedule, build_parser, split_indices
from fastbeit.tokenizer.train import main as train_main

TINY = dict(n_hid=8, n_blk_per_group=1, vocab_size=32, image_size=32, n_init=8)


def tiny_model(seed: int = 0, **overrides) -> DiscreteVAE:
    torch.manual_seed(seed)
    return DiscreteVAE(DVAEConfig(**{**TINY, **overrides}))


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random ``map_pixels``'d images: values in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(batch, 3, size, size, generator=g)


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_and_ids(batch):
    model = tiny_model()
    x = images(batch)
    logits = model.logits(x)
    assert logits.shape == (batch, 32, 4, 4)  # 8× down-sampling
    ids = model.encode(x)
    assert ids.shape == (batch, 4, 4) and ids.dtype == torch.long and not ids.requires_grad
    assert 0 <= int(ids.min()) and int(ids.max()) < 32
    assert torch.equal(ids, model.get_codebook_indices(x))
    recon = model.decode(ids)
    assert recon.shape == (batch, 3, 32, 32) and recon.dtype == torch.float32
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1


def test_112px_gives_14x14():
    model = DiscreteVAE(DVAEConfig(n_hid=4, n_blk_per_group=1, vocab_size=16, n_init=4))
    assert model.encode(images(1, 112)).shape == (1, 14, 14)


def test_fast_paths_match_plain_modules():
    model = tiny_model()
    x = images(2)
    torch.testing.assert_close(model.encoder.logits_last(x), model.logits(x).permute(0, 2, 3, 1))
    ids = model.encode(x)
    one_hot = torch.nn.functional.one_hot(ids, 32).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(model.decoder.forward_ids(ids), model.decoder(one_hot))


def test_output_channels_follow_loss():
    assert tiny_model(loss="logit-laplace").decoder.blocks.output.conv.out_channels == 6
    assert tiny_model(loss="mse").decoder.blocks.output.conv.out_channels == 3


def test_encode_bf16_autocast_and_channels_last():
    model = tiny_model().to(memory_format=torch.channels_last)
    x = images(2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = model.encode(x)
    assert ids.shape == (2, 4, 4) and int(ids.max()) < 32


def test_bad_config_is_user_error():
    with pytest.raises(UserError, match="multiple of 4"):
        DVAEConfig(n_hid=10)
    with pytest.raises(UserError, match="image_size"):
        DVAEConfig(image_size=100)


@pytest.mark.parametrize("loss", ["mse", "logit-laplace"])
def test_loss_falls_on_a_fixed_batch(loss):
    model = tiny_model(seed=1, loss=loss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = images(4, seed=1)
    torch.manual_seed(1)
    history = []
    for _ in range(25):
        out = model(x, temperature=1.0, kl_weight=0.1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(float(out.loss.detach()))
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    assert out.kl >= 0 and 1 <= out.codes <= 32
    assert 0 <= float(out.usage_kl) <= torch.log(torch.tensor(32.0)) + 1e-5


def test_diversity_term_penalizes_a_collapsed_codebook():
    model = tiny_model()
    with torch.no_grad():  # make every position pick code 0 with certainty
        model.encoder.blocks.output.conv.bias.zero_()[0] = 50.0
    collapsed = model(images(2), diversity_weight=1.0, sharpness=0.0, count_codes=True)
    assert collapsed.codes == 1 and float(collapsed.usage_kl) > 3.0
    plain = model(images(2), diversity_weight=0.0)
    assert float(collapsed.loss.detach()) > float(plain.loss.detach()) + 3.0


def test_hard_straight_through_and_noise_pool():
    model = tiny_model()
    pool = GumbelNoisePool(rows=100, vocab=32, refresh=10)
    out = model(images(2), temperature=0.5, kl_weight=1.0, hard=True, noise_pool=pool)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.encoder.blocks.input.weight.grad is not None
    assert pool.cursor == 10 and pool.sample(40).shape == (40, 32)
    assert pool.sample(500).shape == (500, 32)  # larger than the pool: fresh noise


# --- files --------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # round to fp16 first so the fp16 file holds exactly these weights
        for p in model.parameters():
            p.copy_(p.half().float())
    path = save_tokenizer(model, tmp_path / "tok.safetensors")
    assert path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dtype"] == "float16" and meta["config"]["vocab_size"] == 32
    loaded = load_tokenizer(path)
    assert loaded.config == model.config and not loaded.training
    x = images(3)
    assert torch.equal(loaded.encode(x), model.encode(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert torch.equal(load_tokenizer(path.with_suffix(".json")).encode(x), model.encode(x))
    path.with_suffix(".json").unlink()  # the safetensors header also carries the config
    assert torch.equal(load_tokenizer(path).encode(x), model.encode(x))


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.safetensors")
    monkeypatch.setattr("fastbeit.tokenizer.dvae.DEFAULT_TOKENIZER", tmp_path / "gone.safetensors")
    with pytest.raises(UserError, match="shipped tokenizer"):
        load_tokenizer()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(UserError, match="not a safetensors"):
        load_tokenizer(junk)
    path = save_tokenizer(tiny_model(), tmp_path / "tok.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["n_hid"] = 12
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit"):
        load_tokenizer(path)
    path.with_suffix(".json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not a fastbeit tokenizer"):
        load_tokenizer(path)


@pytest.mark.skipif(not DEFAULT_TOKENIZER.is_file(), reason="shipped tokenizer not built yet")
def test_shipped_tokenizer():
    model = load_tokenizer()
    assert model.config.vocab_size == 8192 and model.config.image_size == 112
    assert DEFAULT_TOKENIZER.stat().st_size < 5 * 2**20
    ids = model.encode(images(2, 112))
    assert ids.shape == (2, 14, 14) and int(ids.max()) < 8192
    assert model.decode(ids).shape == (2, 3, 112, 112)


# --- DALL-E's released format -------------------------------------------------------------


def dalle_pickle(tmp_path, n_blk_per_group: int = 1):
    """A file written the way DALL-E's encoder.pkl was: a whole pickled dall_e.Encoder."""
    dall_e = pytest.importorskip("dall_e")
    import attr

    with attr.validators.disabled():  # its validators demand n_hid >= 64 and vocab >= 512
        enc = dall_e.Encoder(n_hid=16, n_blk_per_group=n_blk_per_group, vocab_size=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith(".b"):
                p.normal_(0, 0.1, generator=g)
    path = tmp_path / "encoder.pkl"
    torch.save(enc, path)
    return enc, path


@pytest.mark.extras
@pytest.mark.parametrize("n_blk", [1, 2])
def test_dalle_pickle_gives_identical_ids(tmp_path, n_blk):
    enc, path = dalle_pickle(tmp_path, n_blk)
    model = load_dalle_encoder(path)
    assert (model.config.n_hid, model.config.n_blk_per_group, model.config.vocab_size) == (16, n_blk, 64)
    assert model.decoder is None
    x = images(3, 32, seed=2)
    with torch.no_grad():
        expected = torch.argmax(enc(x), dim=1)
    assert torch.equal(model.encode(x), expected)
    assert torch.equal(load_tokenizer(path).encode(x), expected)  # .pkl dispatches here
    with pytest.raises(UserError, match="no decoder"):
        model.decode(expected)


def test_dalle_errors(tmp_path, monkeypatch):
    """Without the optional dall_e package too (a fresh clone's set-up)."""
    with pytest.raises(UserError, match="not found"):
        load_dalle_encoder(tmp_path / "nope.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"garbage")
    monkeypatch.setitem(sys.modules, "dall_e", None)  # makes `import dall_e` fail
    with pytest.raises(UserError, match="dall_e"):
        load_dalle_encoder(bad)


@pytest.mark.extras
def test_dalle_garbage_file(tmp_path):
    pytest.importorskip("dall_e", reason="the optional dall_e package is not installed")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable"):
        load_dalle_encoder(bad)


# --- training CLI -------------------------------------------------------------------------


def make_folder(root, n: int = 6):
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{i}.png")
    return root


TRAIN_ARGS = ["--n-hid", "4", "--n-blk-per-group", "1", "--vocab-size", "16", "--n-init", "4",
              "--image-size", "16", "--batch-size", "2", "--num-workers", "0", "--val-fraction", "0.34",
              "--grid-images", "2", "--log-every", "1"]


def test_train_cli_tiny(tmp_path, capsys):
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    metrics = train_main(["--data", str(data), "--output", str(out), "--epochs", "1", *TRAIN_ARGS])
    for name in ("checkpoint.pt", "recon.png", "metrics.json", "tokenizer.safetensors", "tokenizer.json",
                 "log.jsonl"):
        assert (out / name).is_file(), name
    assert metrics["heldout_images"] == 2 and metrics["steps"] == 2
    assert 0 < metrics["recon_mse"] < 1 and 1 <= metrics["codes_used"] <= 16
    assert json.loads((out / "metrics.json").read_text())["codes_used"] == metrics["codes_used"]
    assert "reconstruction MSE" in capsys.readouterr().out
    assert load_tokenizer(out / "tokenizer.safetensors").encode(images(1, 16)).shape == (1, 2, 2)
    with Image.open(out / "recon.png") as png:  # two rows of two 16 px images, 2 px padding
        assert png.size == (2 * 18 + 2, 2 * 18 + 2)
    resumed = train_main(["--data", str(data), "--output", str(out), "--epochs", "2", "--resume",
                          *TRAIN_ARGS])
    assert resumed["steps"] == 4


def test_train_cli_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    interrupt_on_call(monkeypatch, DiscreteVAE, "forward", 2)
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(data), "--output", str(out), "--epochs", "3", *TRAIN_ARGS])
    assert exc.value.code == 130
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["epoch"] == 0 and not (out / "checkpoint.pt.tmp").exists()


def test_schedule_and_split():
    a = build_parser().parse_args(["--data", "d", "--output", "o"])
    sched = Schedule(a)
    assert sched.temperature(0) == 1.0 and abs(sched.temperature(a.anneal_fraction) - 1 / 16) < 1e-12
    assert abs(sched.temperature(a.anneal_fraction / 2) - 0.25) < 1e-12  # exponential decay
    assert sched.temperature(1.0) == sched.temperature(a.anneal_fraction)
    assert sched.kl_weight(0) == a.kl_weight_start and sched.kl_weight(1) == a.kl_weight_end
    assert sched.lr(0) == 0 and abs(sched.lr(a.warmup) - a.lr) < 1e-12
    assert abs(sched.lr(1.0) - a.lr * a.min_lr_ratio) < 1e-12
    train, val = split_indices(100, 0.05, seed=0)
    assert len(val) == 5 and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.05, seed=0) == (train, val)
    with pytest.raises(UserError):
        split_indices(100, 0.0, seed=0)


def test_look_cli(tmp_path, capsys):
    path = save_tokenizer(tiny_model(), tmp_path / "tok.safetensors")
    data = make_folder(tmp_path / "data", 2)
    out = tmp_path / "look.png"
    ids = look_main([str(data / "img0.png"), str(data / "img1.png"), "--tokenizer", str(path),
                     "--output", str(out)])
    assert ids.shape == (2, 4, 4) and out.is_file()
    assert "distinct" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        look_main([str(tmp_path / "absent.jpg"), "--tokenizer", str(path)])
    assert exc.value.code == 2


def test_train_cli_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(tmp_path / "absent"), "--output", str(tmp_path / "o")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    data = make_folder(tmp_path / "data", 3)
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(data), "--output", str(tmp_path / "o"), "--resume", *TRAIN_ARGS])
    assert exc.value.code == 2 and "no checkpoint" in capsys.readouterr().err
