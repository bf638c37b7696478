"""Hugging Face ``BeitConfig`` fields ↔ ours, for ``save_pretrained`` folders in and out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:
    from fastbeit.interchange import LoadedCheckpoint


def hf_to_config(hf: Dict[str, Any]) -> Dict[str, Any]:
    """BeitConfig fields from a Hugging Face ``BeitConfig`` dict."""
    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    dim = int(hf.get("hidden_size", 768))
    scale = hf.get("layer_scale_init_value", 0.1)
    return dict(
        img_size=first(hf.get("image_size", 224)), patch_size=first(hf.get("patch_size", 16)),
        in_chans=int(hf.get("num_channels", 3)), embed_dim=dim, depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)), mlp_ratio=int(hf.get("intermediate_size", 4 * dim)) / dim,
        init_values=scale if scale and scale > 0 else None, layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        use_abs_pos_emb=bool(hf.get("use_absolute_position_embeddings", False)),
        use_rel_pos_bias=bool(hf.get("use_relative_position_bias", False)),
        use_shared_rel_pos_bias=bool(hf.get("use_shared_relative_position_bias", False)),
        vocab_size=int(hf.get("vocab_size", 8192)),
    )


def config_to_hf(loaded: LoadedCheckpoint) -> Dict[str, Any]:
    """A Hugging Face ``config.json`` for ``loaded``: every field its architecture depends on."""
    c, kind = loaded.config, loaded.kind
    pooling = bool(loaded.use_mean_pooling) if kind == "classifier" else "norm.weight" not in loaded.state_dict
    arch = {"pretrain": "BeitForMaskedImageModeling", "classifier": "BeitForImageClassification"}.get(kind, "BeitModel")
    out: Dict[str, Any] = dict(
        model_type="beit", architectures=[arch], vocab_size=c["vocab_size"], hidden_size=c["embed_dim"],
        num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
        intermediate_size=int(c["embed_dim"] * c["mlp_ratio"]), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=c.get("init_std", 0.02),
        layer_norm_eps=c.get("layer_norm_eps", 1e-6), image_size=c["img_size"], patch_size=c["patch_size"],
        num_channels=c["in_chans"], use_mask_token="mask_token" in loaded.state_dict,
        use_absolute_position_embeddings=bool(c["use_abs_pos_emb"]),
        use_relative_position_bias=bool(c["use_rel_pos_bias"]),
        use_shared_relative_position_bias=bool(c["use_shared_rel_pos_bias"]),
        layer_scale_init_value=c["init_values"] or 0.0, drop_path_rate=c.get("drop_path_rate", 0.1),
        use_mean_pooling=True if kind == "pretrain" else pooling,  # MIM: one final norm, BeitModel's is Identity
    )
    if kind == "classifier":
        names = list(loaded.meta.get("classes") or [])
        names = names if len(names) == loaded.num_classes else [f"LABEL_{i}" for i in range(loaded.num_classes)]
        out.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    return out
