"""Checkpoint conversion: timm and Hugging Face round trips, logits against timm, format detection."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from fastbeit.checkpoint import load_model_state
from fastbeit.classifier import BeitForImageClassification
from fastbeit.config import make_config
from fastbeit.errors import UserError
from fastbeit.interchange import from_hf, from_timm, from_unilm, infer_config, load_any, to_hf, to_timm
from fastbeit.model import BeitForMaskedImageModeling

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, vocab_size=97, drop_path_rate=0.0)
PER_LAYER = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)




def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values for what the init leaves at 0 or constant (tables, gammas, biases, head)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("table", "gamma", "bias", "head", "norm", "cls_token", "pos_embed")):
                p.normal_(0, 0.3)
    return model.eval()


def classifier(**overrides) -> BeitForImageClassification:
    pooling = overrides.pop("use_mean_pooling", True)
    return randomized(BeitForImageClassification(make_config("beit_tiny", **{**TINY, **PER_LAYER, **overrides}), 10,
                                                 use_mean_pooling=pooling))


def pretraining() -> BeitForMaskedImageModeling:
    return randomized(BeitForMaskedImageModeling(make_config("beit_tiny", **TINY)))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("options", [{}, {"use_mean_pooling": False}, {"use_abs_pos_emb": True}])
def test_timm_round_trip_is_exact(options):
    sd = classifier(**options).state_dict()
    timm_sd = to_timm(sd)
    assert not any(k.endswith("relative_position_index") for k in timm_sd)
    assert_same(from_timm(timm_sd), sd)


def test_pretraining_weights_to_timm_start_fine_tuning():
    sd = pretraining().state_dict()
    out = to_timm(sd)
    assert "mask_token" not in out and not any(k.startswith(("lm_head", "norm.", "rel_pos_bias")) for k in out)
    for i in range(2):
        torch.testing.assert_close(out[f"blocks.{i}.attn.relative_position_bias_table"],
                                   sd["rel_pos_bias.relative_position_bias_table"])


@pytest.mark.parametrize(
    "options,timm_kwargs",
    [
        ({}, {}),
        ({"use_mean_pooling": False}, {"global_pool": "token"}),
        ({"use_abs_pos_emb": True}, {"use_abs_pos_emb": True}),
    ],
)
def test_logits_match_a_small_timm_beit(options, timm_kwargs):
    timm_beit = pytest.importorskip("timm.models.beit")
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                  use_rel_pos_bias=True, init_values=0.1, use_abs_pos_emb=False)
    theirs = randomized(timm_beit.Beit(**{**kwargs, **timm_kwargs}))
    ours = classifier(**options)
    load_model_state(ours, from_timm(theirs.state_dict()), "timm")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        assert expected.abs().max() > 0.1  # a meaningful comparison, not two near-zero heads
    theirs.load_state_dict(to_timm(ours.state_dict()), strict=True)


@pytest.mark.slow
def test_logits_match_timm_beit_base():
    """timm's own BEiT-Base (random weights) against ours on the same weights (about 10 s on a CPU)."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "table" in name or name.startswith("head"):
                p.normal_(0, 0.05)
    sd = from_timm(theirs.state_dict())
    cfg_fields = infer_config(sd)
    assert (cfg_fields["embed_dim"], cfg_fields["depth"], cfg_fields["num_heads"], cfg_fields["img_size"]) == (
        768, 12, 12, 224)
    ours = BeitForImageClassification(make_config("beit_base", drop_path_rate=0.0, **PER_LAYER), 10).eval()
    load_model_state(ours, sd, "timm")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["pretraining", "classifier", "classifier_cls"])
def test_hf_round_trip_is_exact_and_uses_hf_names(which):
    model = {"pretraining": pretraining, "classifier": classifier,
             "classifier_cls": lambda: classifier(use_mean_pooling=False)}[which]()
    sd = model.state_dict()
    hf = to_hf(sd)
    assert_same(from_hf(hf), sd)
    layer = "beit.encoder.layer.1"
    assert {f"{layer}.attention.attention.query.weight", f"{layer}.attention.attention.query.bias",
            f"{layer}.attention.attention.key.weight", f"{layer}.attention.attention.value.bias",
            f"{layer}.attention.output.dense.weight", f"{layer}.layernorm_before.weight",
            f"{layer}.layernorm_after.bias",
            f"{layer}.intermediate.dense.weight", f"{layer}.output.dense.bias", f"{layer}.lambda_1",
            "beit.embeddings.cls_token", "beit.embeddings.patch_embeddings.projection.weight"} <= set(hf)
    assert f"{layer}.attention.attention.key.bias" not in hf
    assert not any("relative_position_index" in k for k in hf)
    torch.testing.assert_close(hf[f"{layer}.attention.attention.key.weight"], sd["blocks.1.attn.qkv.weight"][48:96])
    expected = {
        "pretraining": {"beit.embeddings.mask_token", "layernorm.weight", "lm_head.weight",
                        "beit.encoder.relative_position_bias.relative_position_bias_table"},
        "classifier": {"beit.pooler.layernorm.weight", "classifier.weight",
                       f"{layer}.attention.attention.relative_position_bias.relative_position_bias_table"},
        "classifier_cls": {"beit.layernorm.weight", "classifier.bias"},
    }[which]
    assert expected <= set(hf)


def test_load_any_detects_each_format(tmp_path):
    model = classifier()
    sd = model.state_dict()
    torch.save({"model": sd, "config": model.cfg.to_dict(), "classes": ["a"]}, tmp_path / "ours.pt")
    unilm = {"module." + k: v for k, v in sd.items()}
    torch.save({"model": unilm, "args": argparse.Namespace(lr=4e-3), "epoch": 99}, tmp_path / "unilm.pth")
    save_file({k: v.contiguous() for k, v in to_timm(sd).items()}, str(tmp_path / "timm.safetensors"))
    save_file({k: v.contiguous() for k, v in to_hf(sd).items()}, str(tmp_path / "hf.safetensors"))
    for name, fmt in [("ours.pt", "fastbeit"), ("unilm.pth", "unilm"), ("timm.safetensors", "timm"),
                      ("hf.safetensors", "hf")]:
        loaded = load_any(tmp_path / name)
        assert loaded.format == fmt, name
        assert loaded.kind == "classifier" and loaded.num_classes == 10 and loaded.use_mean_pooling
        assert_same(loaded.state_dict, sd)
        assert fmt in loaded.describe() and "depth 2" in loaded.describe()
        cfg = loaded.config
        assert (cfg["embed_dim"], cfg["num_heads"], cfg["patch_size"], cfg["img_size"]) == (48, 3, 4, 32)
    assert load_any(tmp_path / "ours.pt").meta["classes"] == ["a"]


def test_load_any_on_pretraining_weights_and_unilm_wrapping():
    sd = pretraining().state_dict()
    assert_same(from_unilm({"model": sd}), sd)
    cfg = infer_config(sd)
    assert cfg["use_shared_rel_pos_bias"] and not cfg["use_rel_pos_bias"] and cfg["vocab_size"] == 97


def test_load_any_refuses_what_is_not_beit(tmp_path):
    save_file({"encoder.blocks.input.w": torch.zeros(2)}, str(tmp_path / "tok.safetensors"))
    with pytest.raises(UserError, match="not a BEiT checkpoint.*tokenizer"):
        load_any(tmp_path / "tok.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="expected a dict"):
        load_any(tmp_path / "list.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_any(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="no Hugging Face name"):
        to_hf({"something.else": torch.zeros(1)})


def test_command_line_converts_and_the_result_loads_back(tmp_path, capsys):
    from fastbeit import interchange

    pre = pretraining()
    torch.save({"model": pre.state_dict(), "config": pre.cfg.to_dict()}, tmp_path / "pre.pt")
    assert interchange.main([str(tmp_path / "pre.pt"), str(tmp_path / "hf.safetensors"), "--to", "hf"]) == 0
    assert "fastbeit pre-training checkpoint" in capsys.readouterr().out
    back = load_any(tmp_path / "hf.safetensors")
    assert back.format == "hf" and back.kind == "pretrain"
    assert_same(back.state_dict, pre.state_dict())
    assert interchange.main([str(tmp_path / "hf.safetensors"), str(tmp_path / "timm.safetensors"), "--to", "timm"]) == 0
    assert load_any(tmp_path / "timm.safetensors").format == "timm"
    with pytest.raises(SystemExit) as exc:
        interchange.main([str(tmp_path / "pre.pt"), str(tmp_path / "x.safetensors"), "--to", "fastbeit"])
    assert exc.value.code == 2 and "needs a torch file" in capsys.readouterr().err


def test_a_bare_hf_beit_model_is_recognized(tmp_path):
    model = classifier(use_mean_pooling=False)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    bare = {k[len("beit."):]: v for k, v in to_hf(sd).items()}  # BeitModel.save_pretrained has no "beit." prefix
    save_file(bare, str(tmp_path / "bare.safetensors"))
    loaded = load_any(tmp_path / "bare.safetensors")
    assert loaded.format == "hf" and loaded.kind == "encoder"
    assert_same(loaded.state_dict, sd)
