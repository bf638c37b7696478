"""Checkpoint conversion: timm and Hugging Face round trips, logits against timm, format detection."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers import import_transformers
from safetensors.torch import save_file

from fastbeit.checkpoint import load_model_state
from fastbeit.classifier import BeitForImageClassification, load_pretrained
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


# ---------------------------------------------------------------------------------------------
# Hugging Face folders, head counts, missing weights and errors (real transformers / timm classes)


def save_fastbeit(model: torch.nn.Module, path, **extra) -> str:
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict(), **extra}, path)
    return str(path)


@pytest.mark.parametrize("which", ["pretraining", "classifier", "classifier_cls", "classifier_abs"])
def test_hf_folder_loads_with_from_pretrained_and_gives_the_same_logits(which, tmp_path, capsys):
    transformers = import_transformers()
    from fastbeit import interchange

    model = {"pretraining": pretraining, "classifier": classifier,
             "classifier_cls": lambda: classifier(use_mean_pooling=False),
             "classifier_abs": lambda: classifier(use_abs_pos_emb=True, use_rel_pos_bias=False)}[which]()
    extra = {"num_classes": 10, "classes": [f"c{i}" for i in range(10)]} if which != "pretraining" else {}
    ckpt = save_fastbeit(model, tmp_path / "ours.pt", **extra)
    folder = tmp_path / "hf_out"  # no suffix: a folder, as save_pretrained writes
    assert interchange.main([ckpt, str(folder), "--to", "hf"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["num_attention_heads"] == 3 and config["hidden_size"] == 48
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if which == "pretraining":
            assert config["use_shared_relative_position_bias"] and config["use_mask_token"]
            hf = transformers.BeitForMaskedImageModeling.from_pretrained(folder).eval()
            mask = torch.rand(2, 64) < 0.4
            expected, got = model(x, mask, return_all_tokens=True), hf(pixel_values=x, bool_masked_pos=mask).logits
        else:
            assert config["id2label"]["3"] == "c3" and config["use_mean_pooling"] == (which != "classifier_cls")
            hf = transformers.BeitForImageClassification.from_pretrained(folder).eval()
            expected, got = model(x), hf(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1
    back = load_any(folder)  # and the folder reads back as it was
    assert back.format == "hf" and back.config["num_heads"] == 3
    assert_same(back.state_dict, model.state_dict())
    if which != "pretraining":
        assert back.meta["classes"][3] == "c3"


def test_a_save_pretrained_folder_is_read_with_its_config(tmp_path):
    """Heads 8 wide, no relative position table: only config.json knows the head count."""
    transformers = import_transformers()
    torch.manual_seed(0)
    hf_config = transformers.BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        use_absolute_position_embeddings=True, use_relative_position_bias=False, layer_norm_eps=1e-6, num_labels=5)
    hf = randomized(transformers.BeitForImageClassification(hf_config))
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_any(tmp_path / "hf")
    assert (loaded.config["num_heads"], loaded.config["depth"], loaded.kind) == (4, 2, "classifier")
    cfg = make_config("beit_tiny", **{k: loaded.config[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio",
                      "img_size", "patch_size", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias",
                      "init_values", "layer_norm_eps")})
    ours = BeitForImageClassification(cfg, 5).eval()
    load_model_state(ours, loaded.state_dict, "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


def test_head_count_is_never_guessed(tmp_path, capsys):
    """A timm BEiT with 12-wide heads and no relative position table: refused without a head count."""
    from fastbeit import interchange

    timm_beit = pytest.importorskip("timm.models.beit")
    theirs = randomized(timm_beit.Beit(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4, num_classes=10,
                                       init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=False))
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    with pytest.raises(UserError, match="number of attention heads"):
        load_any(tmp_path / "timm.safetensors")
    loaded = load_any(tmp_path / "timm.safetensors", num_heads=4)
    ours = BeitForImageClassification(make_config("beit_tiny", **{**TINY, **loaded.config, "drop_path_rate": 0.0}),
                                      10).eval()
    load_model_state(ours, loaded.state_dict, "timm")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    stored = classifier()
    stored.cfg.num_heads = 4  # a config that contradicts the table is refused
    with pytest.raises(UserError, match="config says 4 attention heads, the relative position table has 3"):
        load_any(save_fastbeit(stored, tmp_path / "c.pt"))
    # what fastbeit writes records its head count: the converted file needs no flag
    out = tmp_path / "again.safetensors"
    assert interchange.main([str(tmp_path / "timm.safetensors"), str(out), "--to", "timm", "--num_heads", "4"]) == 0
    assert load_any(out).config["num_heads"] == 4
    torch.save(interchange.convert(loaded, "unilm"), tmp_path / "unilm.pth")
    assert load_any(tmp_path / "unilm.pth").config["num_heads"] == 4
    with pytest.raises(SystemExit):
        interchange.main([str(tmp_path / "timm.safetensors"), str(tmp_path / "x.safetensors"), "--to", "timm"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--num_heads" in err


@pytest.mark.parametrize("drop,message", [
    ("blocks.1.mlp.fc2.weight", "missing: blocks.1.mlp.fc2.weight"),
    ("blocks.0.attn.qkv.weight", "missing: blocks.0.attn.qkv.weight"),
    ("blocks.1.", "missing: blocks.1.norm1.weight"),  # the last layer: depth comes from the stored config
])
def test_missing_encoder_weights_are_refused(drop, message, tmp_path):
    model = classifier()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
    torch.save({"model": sd, "config": model.cfg.to_dict()}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=message):
        load_any(tmp_path / "partial.pt")
    with pytest.raises(UserError, match="lack encoder weights"):  # and when loaded for fine-tuning directly
        load_pretrained(BeitForImageClassification(model.cfg, 10), sd)


def test_conversion_refuses_a_pretraining_file_without_its_head(tmp_path, capsys):
    from fastbeit import interchange

    model = pretraining()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"model": sd, "config": model.cfg.to_dict()}, tmp_path / "pre.pt")
    with pytest.raises(SystemExit):
        interchange.main([str(tmp_path / "pre.pt"), str(tmp_path / "hf"), "--to", "hf"])
    assert "lacks lm_head.weight" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit):  # a folder is not a file name for the one-file formats
        interchange.main([str(tmp_path / "pre.pt"), str(tmp_path), "--to", "timm"])
    assert "give a file name" in capsys.readouterr().err


def test_errors_about_foreign_files_are_one_line(tmp_path, capsys):
    from fastbeit import interchange

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object, not weights
    torch.save({"kind": "segmentation", "model": {"backbone.cls_token": torch.zeros(1)}, "config": {}},
               tmp_path / "seg.pt")
    for name, words in (("module.pt", "torch.nn.modules.linear.Linear"), ("seg.pt", "segmentation checkpoint")):
        with pytest.raises(SystemExit):
            interchange.main([str(tmp_path / name), str(tmp_path / "out.pt"), "--to", "fastbeit"])
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}") and words in err and err.count("\n") == 1, err
        assert "\x1b" not in err and "weights_only" not in err and "Please file" not in err


def test_the_repository_kernels_folder_does_not_shadow_pypi_kernels():
    """From the repository root (a user's working directory), ``import kernels`` is PyPI's package
    (Hugging Face transformers imports it) or a missing module, never fastbeit's kernels/."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import fastbeit.kernels as ours\n"
              "try:\n"
              "    import kernels\n"
              "    print('pypi' if 'use_triton' not in vars(kernels) else 'shadowed', kernels.__file__)\n"
              "except ModuleNotFoundError:\n"
              "    print('missing')\n"
              "import fastbeit.kernels\n"
              "print('ours' if ours.use_triton is fastbeit.kernels.use_triton else 'changed')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    assert first.split()[0] in ("pypi", "missing") and str(root) not in first, first
    assert second == "ours"
