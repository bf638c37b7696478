"""The tokenizer's inference form: the same ids as the module it was built from, its own precision
whatever the caller's autocast, and one clear error for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fastbeit.errors import UserError
from fastbeit.tokenizer import DEFAULT_TOKENIZER, DiscreteVAE, DVAEConfig, load_tokenizer, save_tokenizer
from fastbeit.tokenizer.infer import (
    DEFAULT_PRECISION,
    PRECISIONS,
    InferenceTokenizer,
    build_tokenizer,
    fold_post_gain,
    module_ids,
)

SAMPLE = Path(__file__).resolve().parents[1] / "fastbeit" / "assets" / "sample"


def tiny(n_blk: int = 1, vocab: int = 40, seed: int = 0) -> DiscreteVAE:
    torch.manual_seed(seed)
    model = DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=n_blk, vocab_size=vocab, image_size=32, n_init=8))
    with torch.no_grad():  # non-zero biases, so that folding them is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(batch, 3, size, size, generator=g)


def photos(size: int = 112, limit: int = 6) -> torch.Tensor:
    """A few of the shipped sample photos as ``map_pixels``'d tokenizer views."""
    import torchvision.transforms.functional as TF

    from fastbeit.data.transforms import map_pixels

    paths = sorted(p for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    views = []
    for p in paths:
        with Image.open(p) as img:
            img = TF.center_crop(TF.resize(img.convert("RGB"), size), size)
            views.append(map_pixels(TF.to_tensor(img)))
    return torch.stack(views)


@pytest.mark.parametrize("n_blk", [1, 2])  # post_gain 1/16 and 1/64: powers of two, folded exactly
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_form_gives_identical_ids_fp32(n_blk, channels_last):
    model = tiny(n_blk)
    x = images(3, seed=n_blk)
    tok = InferenceTokenizer(model, "fp32", channels_last=channels_last)
    assert torch.equal(tok.encode(x), model.encode(x))
    unfolded = model.encoder.blocks[:-1](x)
    if channels_last:  # another conv algorithm on a CPU: equal up to rounding
        torch.testing.assert_close(tok.features(x), unfolded, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(tok.features(x), unfolded)  # bit-identical activations
    assert torch.equal(InferenceTokenizer(model, "fp32", fold=False).encode(x), model.encode(x))


def test_fold_with_a_gain_that_is_not_a_power_of_two():
    model = tiny(3)  # post_gain 1/144: rounding may differ in the last bit
    folded = fold_post_gain(model.encoder)
    x = images(2)
    torch.testing.assert_close(folded(x), model.encoder(x), rtol=1e-5, atol=1e-5)
    assert all(getattr(m, "post_gain", 1) == 1 for m in folded.modules())
    assert all(m.post_gain != 1 for m in model.encoder.modules() if hasattr(m, "post_gain"))  # original untouched


@pytest.mark.skipif(not DEFAULT_TOKENIZER.is_file(), reason="shipped tokenizer not built yet")
def test_shipped_tokenizer_same_ids_on_real_and_random_images():
    model = load_tokenizer()
    tok = build_tokenizer(None, "cpu", "fp32")
    for x in (photos(), images(2, 112, seed=5)):
        assert torch.equal(tok.encode(x), module_ids(model, x))
    assert tok.config.vocab_size == 8192


def test_fused_head_in_the_interpreter_same_ids():
    model = tiny(1, vocab=70)
    x = images(2, seed=3)
    fused = InferenceTokenizer(model, "fp32", head="triton")
    assert torch.equal(fused.encode(x), model.encode(x))
    fused, chunked = (InferenceTokenizer(model, "bf16", head=h) for h in ("triton", "torch"))
    assert torch.equal(fused.encode(x), chunked.encode(x))  # bf16 operands, fp32 logits in both


def test_own_precision_ignores_the_callers_autocast():
    model = tiny(2, vocab=300)
    x = images(4, seed=7)
    expected = model.encode(x)
    for precision in ("fp32", "tf32"):  # tf32 is fp32 on a CPU
        tok = InferenceTokenizer(model, precision)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(tok.encode(x), expected)
    bf16 = InferenceTokenizer(model, "bf16")
    with torch.autocast("cpu", dtype=torch.float16):
        feats = bf16.features(x)
        ids = bf16.encode(x)
    assert feats.dtype == torch.bfloat16 and ids.dtype == torch.long and ids.shape == (4, 4, 4)
    assert (ids == expected).float().mean() > 0.8
    assert torch.is_autocast_enabled("cpu") is False


def test_precision_flag_and_default():
    from fastbeit.pretrain import build_parser

    assert DEFAULT_PRECISION in PRECISIONS
    assert build_parser().parse_args([]).tokenizer_precision == DEFAULT_PRECISION
    assert build_parser().parse_args(["--tokenizer_precision", "bf16"]).tokenizer_precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tokenizer_precision", "fp16"])
    with pytest.raises(UserError, match="precision"):
        InferenceTokenizer(tiny(), "fp8")


def test_bad_inputs_one_clear_error_each(tmp_path):
    path = save_tokenizer(tiny(), tmp_path / "tok.safetensors")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {}}, ckpt)
    with pytest.raises(UserError, match="checkpoint, not a tokenizer"):
        build_tokenizer(str(ckpt))
    photo = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(photo)
    with pytest.raises(UserError, match="not a tokenizer file"):
        build_tokenizer(str(photo))
    with pytest.raises(UserError, match="decoder"):
        build_tokenizer(str(tmp_path / "decoder.pkl"))
    with pytest.raises(UserError, match="vocabulary of 40 ids but the model predicts 8192"):
        build_tokenizer(str(path), vocab_size=8192)
    with pytest.raises(UserError, match="cannot take 100x100 px"):
        build_tokenizer(str(path), image_size=100)
    tok = build_tokenizer(str(path), vocab_size=40, image_size=48)
    assert tok.encode(images(1, 48)).shape == (1, 6, 6)
    with pytest.raises(UserError, match="cannot take 36x40"):
        tok.encode(images(1, 40)[:, :, :36])
    with pytest.raises(UserError, match=r"images \[B, 3, H, W\]"):
        tok.encode(torch.rand(1, 1, 32, 32))


def test_pretrain_rejects_a_wrong_tokenizer_file(tmp_path, capsys):
    from fastbeit.pretrain import main

    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        main(["--tokenizer", str(ckpt), "--max_steps", "1", "--output", str(tmp_path / "run"), "--no_progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "not a tokenizer" in err[-1]


@pytest.mark.parametrize("n_blk", [1, 2])
def test_dalle_encoder_pickle_inference_form_same_ids(tmp_path, n_blk):
    from test_tokenizer import dalle_pickle

    enc, path = dalle_pickle(tmp_path, n_blk)
    x = images(3, 32, seed=4)
    with torch.no_grad():
        expected = torch.argmax(enc(x), dim=1)
    tok = build_tokenizer(str(path), "cpu", "fp32", vocab_size=64)
    assert torch.equal(tok.encode(x), expected)


def test_forms_table_for_the_report():
    from fastbeit.tokenizer.forms import FORMS, forms_markdown, measure_forms

    rows = measure_forms(tiny(1, vocab=50), images(2), warmup=1, iters=1, step_ms=1000.0)
    assert list(rows)[0] == "eager-fp32" and set(rows) == set(FORMS) - {"compile"}
    for name in ("eager-fp32", "plain", "folded", "channels-last", "fused-head", "tf32", "default"):
        assert rows[name]["agree"] == 1.0 and rows[name]["ms"] > 0 and 0 < rows[name]["share"] < 1, name
    text = "\n".join(forms_markdown(rows, 2))
    assert "| fused-head |" in text and "share of the step" in text
