"""Weight-decay groups and the per-step schedule, as in the original code."""

from __future__ import annotations

import math

import numpy as np
from helpers import TINY

from fastbeit.model import create_model
from fastbeit.optim import build_adamw, cosine_schedule, decay_groups, no_decay_names, set_step_values


def test_decay_groups_follow_the_original_rules():
    model = create_model("beit_tiny", **TINY, use_abs_pos_emb=True)
    no_decay, decay = decay_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    nd, d = set(no_decay["param_names"]), set(decay["param_names"])
    assert {"cls_token", "pos_embed", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
            "blocks.0.norm1.weight", "norm.weight", "lm_head.bias", "patch_embed.proj.bias"} <= nd
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.qkv.weight",
            "patch_embed.proj.weight", "lm_head.weight"} <= d
    assert nd.isdisjoint(d) and len(nd | d) == len(list(model.parameters()))


def test_rel_pos_tables_leave_weight_decay_on_request():
    for overrides in ({}, {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}):
        model = create_model("beit_tiny", **TINY, **overrides)
        tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
        assert len(tables) == (1 if not overrides else 2)
        assert no_decay_names(model) == {"pos_embed", "cls_token"}
        no_decay, decay = decay_groups(model, 0.05, no_decay_names(model, rel_pos_bias=True))
        assert tables <= set(no_decay["param_names"]) and tables.isdisjoint(decay["param_names"])


def test_cosine_schedule_with_linear_warmup_from_zero():
    s = cosine_schedule(1.5e-3, 1e-5, epochs=10, steps_per_epoch=7, warmup_epochs=2)
    assert len(s) == 70
    assert s[0] == 0.0 and math.isclose(s[13], 1.5e-3)
    assert np.all(np.diff(s[:14]) > 0) and np.all(np.diff(s[14:]) <= 0)
    assert math.isclose(s[14], 1.5e-3) and 1e-5 < s[-1] < 1.2e-5  # the last step is one short of the end
    mid = 14 + (70 - 14) // 2
    assert math.isclose(s[mid], 1e-5 + 0.5 * (1.5e-3 - 1e-5), rel_tol=1e-9)


def test_step_values_touch_only_decayed_groups():
    model = create_model("beit_tiny", **TINY)
    opt = build_adamw(decay_groups(model, 0.05), lr=1.0)
    set_step_values(opt, 0.25, 0.07)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.07]
