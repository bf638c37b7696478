"""What a BEiT checkpoint must hold: every encoder weight of its config, in its shape, and the
top weights of its kind. Loading refuses anything less instead of leaving weights at their init."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import torch

from fastbeit.errors import UserError

if TYPE_CHECKING:
    from fastbeit.interchange import LoadedCheckpoint

TABLE = "relative_position_bias_table"


def encoder_shapes(c: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Every encoder weight a model of config ``c`` has, with its shape (our names, no index buffers)."""
    dim, heads, hidden = c["embed_dim"], c["num_heads"], int(c["embed_dim"] * c["mlp_ratio"])
    patch, side = c["patch_size"], c["img_size"] // c["patch_size"]
    table = ((2 * side - 1) ** 2 + 3, heads)
    out: Dict[str, Tuple[int, ...]] = {"cls_token": (1, 1, dim), "patch_embed.proj.weight": (dim, c["in_chans"],
                                       patch, patch), "patch_embed.proj.bias": (dim,)}
    if c["use_abs_pos_emb"]:
        out["pos_embed"] = (1, side * side + 1, dim)
    if c["use_shared_rel_pos_bias"]:
        out[f"rel_pos_bias.{TABLE}"] = table
    for i in range(c["depth"]):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                 "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,),
                 "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                 "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
        if c["qkv_bias"]:
            block.update({"attn.q_bias": (dim,), "attn.v_bias": (dim,)})
        if c["use_rel_pos_bias"]:
            block[f"attn.{TABLE}"] = table
        if c["init_values"]:
            block.update({"gamma_1": (dim,), "gamma_2": (dim,)})
        out.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return out


def _listing(keys: List[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_encoder(state: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
    """:class:`UserError` unless ``state`` holds every encoder weight of ``config``, in its shape,
    and no blocks beyond its depth."""
    expected = encoder_shapes(config)
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"encoder weights are missing: {_listing(missing)}")
    bad = [f"{k} {tuple(state[k].shape)} (expected {v})" for k, v in expected.items() if tuple(state[k].shape) != v]
    if bad:
        raise UserError(f"encoder weights have the wrong shape: {_listing(bad, 2)}")
    extra = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")} - set(range(config["depth"])))
    if extra:
        raise UserError(f"blocks {extra} lie beyond the depth {config['depth']} of the config")


# Beside the encoder: what each kind of checkpoint must hold to convert completely.
KIND_KEYS = {
    "pretrain": ("mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"),
    "classifier": ("head.weight", "head.bias"),
}


def check_complete(loaded: LoadedCheckpoint) -> None:
    """:class:`UserError` when a pre-training or classifier checkpoint lacks its own top weights."""
    state = loaded.state_dict
    needed = list(KIND_KEYS.get(loaded.kind, ()))
    if loaded.kind == "classifier":
        needed += ["fc_norm.weight", "fc_norm.bias"] if loaded.use_mean_pooling else ["norm.weight", "norm.bias"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{loaded.path}: this {loaded.kind} checkpoint lacks {_listing(missing)}")
