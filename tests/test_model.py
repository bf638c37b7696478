"""The fast model against the reference model, and the original init / structure."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY, tiny_pair, variable_masks

from fastbeit.config import make_config
from fastbeit.errors import UserError
from fastbeit.layers import relative_position_index
from fastbeit.model import create_model
from fastbeit.reference import create_reference_model


def run_step(model, images, masks, ids):
    model.zero_grad(set_to_none=True)
    out = model.forward_loss(images, masks, ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "attn,kernels,options",
    [
        ("eager", "reference", {}),
        ("sdpa", "reference", {}),
        ("sdpa", "reference", {"use_abs_pos_emb": True}),
        ("sdpa", "reference", {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}),
        ("eager", "reference", {"use_abs_pos_emb": True, "init_values": None, "use_shared_rel_pos_bias": False}),
        ("triton", "triton", {}),
        ("triton", "triton", {"use_abs_pos_emb": True}),
    ],
)
def test_fast_matches_reference(attn, kernels, options):
    fast, ref = tiny_pair(attn_backend=attn, kernels=kernels, **options)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    masks = variable_masks(3, 8, 25)
    assert len(set(masks.sum(1).tolist())) > 1, "want variable masked counts"
    ids = torch.randint(0, TINY["vocab_size"], (3, 64))

    out_f, grads_f = run_step(fast, images, masks, ids)
    out_r, grads_r = run_step(ref, images, masks, ids)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_f.mlm_acc, out_r.mlm_acc)
    with torch.no_grad():
        torch.testing.assert_close(fast(images, masks), ref(images, masks), rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_keys_follow_the_original_names():
    keys = set(create_model("beit_tiny", **TINY).state_dict())
    for key in [
        "cls_token", "mask_token", "patch_embed.proj.weight", "rel_pos_bias.relative_position_bias_table",
        "rel_pos_bias.relative_position_index", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias",
        "blocks.0.attn.v_bias", "blocks.0.attn.proj.weight", "blocks.0.gamma_1", "blocks.1.mlp.fc2.weight",
        "norm.weight", "lm_head.weight", "lm_head.bias",
    ]:
        assert key in keys, key
    assert "blocks.0.attn.qkv.bias" not in keys  # k has no bias: q_bias / v_bias only
    per_layer_model = create_model("beit_tiny", **TINY, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    per_layer = set(per_layer_model.state_dict())
    assert "blocks.1.attn.relative_position_bias_table" in per_layer
    assert not any(k.startswith("rel_pos_bias") for k in per_layer)


def test_init_matches_the_original():
    torch.manual_seed(0)
    model = create_model("beit_tiny")  # depth 12, width 192
    std = 0.02
    # A normal truncated at ±1σ has std σ·0.5396.
    trunc_std = std * math.sqrt(1 - 2 * 1 * math.exp(-0.5) / math.sqrt(2 * math.pi) / (math.erf(1 / math.sqrt(2))))
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= std + 1e-7
    assert abs(qkv.std().item() - trunc_std) < 0.03 * trunc_std
    assert abs(model.lm_head.weight.std().item() - trunc_std) < 0.03 * trunc_std
    for layer, block in enumerate(model.blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            expected = trunc_std / math.sqrt(2 * layer)
            assert abs(weight.std().item() - expected) < 0.05 * expected, (layer, weight.std().item(), expected)
            assert weight.abs().max() <= std / math.sqrt(2 * layer) + 1e-7
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        assert torch.all(block.attn.proj.bias == 0) and torch.all(block.mlp.fc1.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert torch.all(model.rel_pos_bias.relative_position_bias_table == 0)
    for token in (model.cls_token, model.mask_token, model.patch_embed.proj.weight):
        assert token.abs().max() <= std + 1e-7 and token.std() > 0.5 * trunc_std
    assert torch.all(model.patch_embed.proj.bias == 0) and torch.all(model.lm_head.bias == 0)
    assert model.pos_embed is None
    large = make_config("beit_large")
    assert (large.embed_dim, large.depth, large.num_heads, large.init_values) == (1024, 24, 16, 1e-5)


def test_drop_path_is_linear_over_depth():
    model = create_model("beit_tiny", drop_path_rate=0.1)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.1, rel_tol=1e-6)
    assert all(math.isclose(b - a, 0.1 / 11, rel_tol=1e-4) for a, b in zip(rates, rates[1:]))


def test_mlp_applies_dropout_once_after_fc2():
    """The original comments out the dropout after the activation (as in BERT): one dropout, after fc2."""
    model = create_model("beit_tiny", **TINY, drop_rate=0.5).train()
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 48)
    torch.manual_seed(3)
    out = mlp(x)
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))), 0.5, training=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    ref = create_reference_model("beit_tiny", **TINY, drop_rate=0.5).train()
    assert type(ref.blocks[0].mlp) is type(mlp)  # the reference shares this Mlp


def test_relative_position_index():
    index = relative_position_index((14, 14))
    assert index.shape == (197, 197)
    num = 27 * 27 + 3
    assert index[0, 0] == num - 1 and index[0, 5] == num - 3 and index[5, 0] == num - 2
    assert index[1:, 1:].max() == 27 * 27 - 1 and index[1:, 1:].min() == 0
    # patch pairs index by their offset only: (r, c) → (r+1, c+2) is the same everywhere
    grid = lambda r, c: 1 + r * 14 + c
    assert index[grid(0, 0), grid(1, 2)] == index[grid(5, 7), grid(6, 9)]
    assert index[grid(3, 3), grid(3, 3)] == 13 * 27 + 13  # zero offset sits at the table's centre


def test_mask_token_replaces_masked_patches_only():
    fast, _ = tiny_pair(kernels="reference")
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :10] = True
    patches = fast.patch_embed(images)
    from fastbeit import ops

    x = ops.masked_embed(patches, masks, fast.mask_token, fast.cls_token, None, "reference")
    assert torch.equal(x[:, 0], fast.cls_token[0].expand(2, -1))
    assert torch.equal(x[0, 1:11], fast.mask_token[0].expand(10, -1))
    assert torch.equal(x[0, 11:], patches[0, 10:]) and torch.equal(x[1, 1:], patches[1])


def test_bad_configs_raise_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        create_model("beit_huge")
    with pytest.raises(UserError, match="not divisible"):
        create_model("beit_tiny", img_size=30, patch_size=4)
    with pytest.raises(UserError, match="attention backend"):
        create_model("beit_tiny", attn_backend="fast")
    with pytest.raises(ValueError, match="does not match"):
        m = create_model("beit_tiny", **TINY)
        m(torch.randn(1, 3, 48, 48), torch.zeros(1, 144, dtype=torch.bool))


def test_flash_backend_refuses_a_bias_clearly():
    fast, _ = tiny_pair(attn_backend="flash")
    with pytest.raises(UserError, match="flash"):
        fast.forward_loss(torch.randn(1, 3, 32, 32), torch.ones(1, 64, dtype=torch.bool), torch.zeros(1, 64).long())


def test_reference_is_a_separate_implementation():
    ref = create_reference_model("beit_tiny", **TINY)
    assert type(ref.blocks[0].attn).__module__ == "fastbeit.reference"
