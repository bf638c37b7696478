"""Visualization: the recomputed attention matches the model's, both PNG modes run, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbeit import visualize
from fastbeit.attention import eager_attention
from fastbeit.config import make_config
from fastbeit.layers import qkv_projection
from fastbeit.model import BeitForMaskedImageModeling
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig, save_tokenizer

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, vocab_size=64, drop_path_rate=0.0)




def tiny_model(**overrides) -> BeitForMaskedImageModeling:
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(make_config("beit_tiny", **{**TINY, **overrides}))
    with torch.no_grad():  # non-zero position tables and q/v biases, so the bias path is exercised
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("per_layer", [False, True])
def test_recomputed_attention_matches_the_model(per_layer):
    overrides = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False) if per_layer else {}
    model = tiny_model(**overrides)
    images = torch.randn(2, 3, 64, 64)
    attn = model.blocks[1].attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], bias=args[1]))
    attn.register_forward_hook(lambda m, args, out: seen.update(out=out))
    probs = visualize.block_attention(model, images, 1)
    assert probs.shape == (2, 3, 65, 65)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 65))

    x = seen["x"]
    q, k, v = qkv_projection(x, attn.qkv.weight, attn.q_bias, attn.v_bias).reshape(2, 65, 3, 3, 16).permute(
        2, 0, 3, 1, 4).unbind(0)
    bias = seen["bias"]
    if per_layer:
        from fastbeit.layers import gather_relative_bias

        bias = gather_relative_bias(attn.relative_position_bias_table, attn.relative_position_index)
    eager = eager_attention(q, k, v, bias, attn.scale, 0.0, False)
    torch.testing.assert_close(probs @ v, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the block's real (fused-backend) output follows from these probabilities
        out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 65, 48))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("vis")
    model = tiny_model()
    ckpt = base / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict(),
                "args": {"num_mask_patches": 75, "min_mask_patches_per_block": 16}}, ckpt)
    torch.manual_seed(0)
    tok = save_tokenizer(DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64)),
                         base / "tok.safetensors")
    enc_only = save_tokenizer(DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64,
                                                     decoder=False)), base / "enc_only.safetensors")
    image = base / "photo.jpg"
    yy, xx = np.mgrid[0:80, 0:100]
    pixels = np.stack([xx * 2.5, yy * 3, (xx + yy) % 256], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(image)
    return dict(ckpt=ckpt, tok=tok, enc_only=enc_only, image=image, base=base)


def test_attention_png(files, tmp_path, capsys):
    out = tmp_path / "attn.png"
    args = ["attention", "--checkpoint", str(files["ckpt"]), "--image", str(files["image"]), str(files["image"]),
            "--output", str(out), "--patch", "2", "5", "--block", "0"]
    assert visualize.main(args) == 0
    assert out.stat().st_size > 5000 and "block 0 (3 heads)" in capsys.readouterr().out


def test_mim_png(files, tmp_path, capsys):
    out = tmp_path / "mim.png"
    args = ["mim", "--checkpoint", str(files["ckpt"]), "--tokenizer", str(files["tok"]),
            "--image", str(files["image"]), "--output", str(out)]
    assert visualize.main(args) == 0
    assert out.stat().st_size > 5000 and "masked-token accuracy" in capsys.readouterr().out


def test_mask_generator_scales_to_the_grid():
    gen = visualize.mask_generator((8, 8), {"num_mask_patches": 75, "min_mask_patches_per_block": 16}, None)
    assert gen.num_masking_patches == round(75 * 64 / 196)
    mask = gen()
    assert 0 < mask.sum() <= gen.num_masking_patches


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        visualize.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_clear_errors(files, tmp_path, capsys):
    ckpt, image, out = files["ckpt"], files["image"], tmp_path / "x.png"
    attention = ["attention", "--checkpoint", ckpt, "--output", out]
    assert "does not exist" in error_of([*attention, "--image", tmp_path / "missing.jpg"], capsys)
    err = error_of([*attention, "--image", image, "--patch", "8", "0"], capsys)
    assert "outside the 8x8 patch grid" in err
    assert "outside the model's 2 blocks" in error_of([*attention, "--image", image, "--block", "5"], capsys)
    seg = tmp_path / "seg.pt"
    torch.save({"kind": "segmentation", "model": {"backbone.cls_token": torch.zeros(1)}, "config": {}}, seg)
    assert "segmentation checkpoint" in error_of(["attention", "--checkpoint", seg, "--image", image,
                                                  "--output", out], capsys)
    cls = tmp_path / "cls.pt"
    torch.save({"model": {"head.weight": torch.zeros(1)}, "config": {}}, cls)
    assert "not a pre-training checkpoint" in error_of(["attention", "--checkpoint", cls, "--image", image,
                                                        "--output", out], capsys)
    err = error_of(["mim", "--checkpoint", ckpt, "--tokenizer", files["enc_only"], "--image", image,
                    "--output", out], capsys)
    assert "has no decoder" in err
    assert not Path(out).exists()
