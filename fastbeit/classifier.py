"""BEiT for image classification: the original fine-tuning model, pre-trained weight loading and
layer-wise learning-rate decay.

The model is the pre-training encoder with a different top: the patch tokens are mean-pooled and
normalized by ``fc_norm`` (the final ``norm`` is then an identity), or, with
``use_mean_pooling=False``, the CLS token after ``norm``; then ``head``. Fine-tuning uses one
relative position table per layer (``use_rel_pos_bias=True``), each a copy of the shared
pre-training table (:func:`load_pretrained`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastbeit.config import BeitConfig
from fastbeit.errors import UserError
from fastbeit.layers import init_beit_weights, wide_trunc_normal_
from fastbeit.model import BeitEncoder
from fastbeit.optim import no_decay_names

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
PRETRAIN_ONLY_PREFIXES = ("mask_token", "lm_head.")
# What fine-tuning creates when a checkpoint lacks it (besides relative position tables, which start at 0;
# "fpn" are the segmentation backbone's necks).
CREATED_PREFIXES = ("head.", "fc_norm.", "norm.", "pos_embed", "fpn")


class BeitForImageClassification(BeitEncoder):
    """The original fine-tuning model: ``forward(images) -> logits``.

    ``num_classes=0`` gives no head (``forward`` returns the pooled features), as for a linear probe.
    """

    def __init__(
        self, cfg: BeitConfig, num_classes: int = 1000, use_mean_pooling: bool = True, init_scale: float = 0.001
    ) -> None:
        super().__init__(cfg)
        self.num_classes = num_classes
        self.use_mean_pooling = use_mean_pooling
        dim, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if use_mean_pooling else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float = 0.001) -> None:
        """The original fine-tuning model's init (not the pre-training one): timm's wide truncated
        normal for CLS, positions and Linear weights, the patch-embedding conv at PyTorch's default,
        the ``sqrt(2·layer)`` rescale; then the head scaled by ``init_scale`` so fine-tuning starts
        near zero logits."""
        for param in (self.cls_token, self.pos_embed):
            if param is not None:
                wide_trunc_normal_(param, self.cfg.init_std)
        self.patch_embed.proj.reset_parameters()
        init_beit_weights(self, self.cfg.init_std, finetune=True)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS prepended and absolute positions added: ``[B, N+1, D]``."""
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def run_first_blocks(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Only the first ``num_blocks`` blocks (for features of an intermediate block)."""
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks[:num_blocks]:
            x = block(x, rel_pos_bias)
        return x

    def forward_features(self, images: torch.Tensor, return_block: Optional[int] = None) -> torch.Tensor:
        """Pooled features ``[B, D]``.

        Without ``return_block``: what the head sees (``fc_norm`` of the mean patch token, or the
        normalized CLS token). With ``return_block=k`` (1-based, ``1 <= k <= depth``): the plain
        average of the patch tokens after block ``k``, no normalization (the linear probe's input).
        """
        x = self.embed(images)
        if return_block is not None:
            if not 1 <= return_block <= len(self.blocks):
                raise UserError(f"block {return_block} is out of range: the model has blocks 1..{len(self.blocks)}")
            return self.run_first_blocks(x, return_block)[:, 1:].mean(1)
        x = self.norm(self.run_blocks(x))
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(1))
        return x[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (clipped to the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top.eq(targets.view(-1, 1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def layer_id_for(name: str, num_layers: int) -> int:
    """The original assignment: 0 = embeddings, ``i+1`` = block ``i``, ``L+1`` = everything else
    (the final norms, the head and a shared relative position table)."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_scales(num_layers: int, layer_decay: float) -> List[float]:
    """``decay ** (L + 1 - id)`` for ids ``0 .. L+1``: the head learns at the full rate."""
    return [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def layer_decay_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, skip: Optional[Iterable[str]] = None
) -> List[Dict]:
    """AdamW parameter groups, one per (layer, decay or not), each with its ``lr_scale``.

    No weight decay for 1-D tensors, biases and ``skip`` (the model's ``no_weight_decay()``:
    ``pos_embed``, ``cls_token``), as in the original fine-tuning code; the relative position
    tables are 2-D and therefore decayed there too.
    """
    skip = set(no_decay_names(model) if skip is None else skip)
    num_layers = model.get_num_layers() if hasattr(model, "get_num_layers") else len(model.blocks)
    scales = layer_scales(num_layers, layer_decay)
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim == 1 or name.endswith(".bias") or name in skip)
        layer_id = layer_id_for(name, num_layers)
        group = groups.setdefault((layer_id, decayed), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": scales[layer_id], "layer_id": layer_id,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# Loading pre-trained weights


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys the model kept at their init, keys it ignored, resizes."""

    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = list(self.notes)
        if self.missing:
            parts.append(f"newly initialized: {', '.join(self.missing)}")
        if self.unused:
            parts.append(f"not used: {', '.join(self.unused)}")
        return "; ".join(parts) if parts else "all weights loaded as they are"


def table_grid(rows: int) -> Tuple[int, int]:
    """The square patch grid of a relative position table with ``(2h-1)^2 + 3`` rows."""
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise UserError(f"a relative position table of {rows} rows does not belong to a square patch grid")
    return (side + 1) // 2, (side + 1) // 2


REL_POS_MODES = ("geometric", "bicubic", "bilinear")
GEOMETRIC_BOUNDS = (1.01, 1.5)  # the original's search interval for the spacing ratio


def check_rel_pos_mode(mode: str) -> None:
    """Raise :class:`UserError` for a table resize mode that :func:`resize_rel_pos_table` lacks."""
    if mode not in REL_POS_MODES:
        raise UserError(f"unknown relative position interpolation {mode!r}; choose from {', '.join(REL_POS_MODES)}")


def geometric_ratio(src_side: int, dst_side: int) -> float:
    """The original fine-tuning code's spacing ratio ``q`` for resizing a table side ``S`` to ``T``.

    Bisection for ``q`` with ``1 + q + ... + q^(S//2 - 1) ≈ T//2``, so that the outermost source
    offset lands near the outermost target offset while the offsets near zero stay about one apart.
    As in the original, ``q`` is the last midpoint tried once the bracket is under 1e-6 (so it is
    pinned near 1.01 when shrinking and near 1.5 when the series cannot reach ``T//2``).
    """
    terms, target = src_side // 2, dst_side // 2
    low, high = GEOMETRIC_BOUNDS
    q = (low + high) / 2
    while high - low > 1e-6:
        q = (low + high) / 2
        if (1.0 - q**terms) / (1.0 - q) > target:
            high = q
        else:
            low = q
    return q


def geometric_source_axis(src_side: int, dst_side: int) -> np.ndarray:
    """The coordinates the original gives the ``S`` source offsets on each axis: symmetric about 0,
    spacing 1, q, q^2, ... outwards from ±1, so the last one is the series sum ≈ ``T//2``."""
    q = geometric_ratio(src_side, dst_side)
    right = np.cumsum(q ** np.arange(src_side // 2, dtype=np.float64))
    return np.concatenate((-right[::-1], [0.0], right))


def geometric_target_axis(dst_side: int) -> np.ndarray:
    """The integer offsets ``-T//2 .. T//2`` of the target table side, as float64."""
    t = dst_side // 2
    return np.arange(-t, t + 1, dtype=np.float64)


def _geometric_offsets(offsets: torch.Tensor, src_side: int, dst_side: int) -> torch.Tensor:
    """Per head, an s=0 bicubic spline through the ``S×S`` map on the geometric source grid,
    evaluated at the integer target offsets (float64; what ``interp2d(kind='cubic')`` computed for
    gridded data). Targets past the outermost source offset take the clamped edge value, as there."""
    from scipy.interpolate import RectBivariateSpline  # lazy: only checkpoint loading needs SciPy

    src = geometric_source_axis(src_side, dst_side)
    dst = geometric_target_axis(dst_side)
    maps = offsets.detach().to("cpu", torch.float64).numpy().reshape(src_side, src_side, -1)  # [dy, dx, head]
    out = np.empty((dst_side, dst_side, maps.shape[-1]), dtype=np.float64)
    for head in range(maps.shape[-1]):
        spline = RectBivariateSpline(src, src, maps[..., head], kx=3, ky=3, s=0)  # rows are dy, columns dx
        out[..., head] = spline(dst, dst)
    return torch.from_numpy(out.reshape(dst_side * dst_side, -1))


def _interpolated_offsets(offsets: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int],
                          mode: str) -> torch.Tensor:
    """Resize the offset map as an image with corners aligned (zero offset stays the centre)."""
    heads = offsets.shape[1]
    image = offsets.float().t().reshape(1, heads, *src_hw)
    resized = F.interpolate(image, size=dst_hw, mode=mode, align_corners=True)
    return resized.reshape(heads, -1).t()


def resize_rel_pos_table(
    table: torch.Tensor, grid: Tuple[int, int], mode: str = "geometric"
) -> torch.Tensor:
    """Resize a ``[(2h-1)(2w-1)+3, heads]`` table to another patch grid; the three CLS rows are kept.

    ``geometric`` (default) is the original BEiT fine-tuning scheme (see :func:`geometric_ratio`),
    square grids only (a non-square one raises :class:`UserError`: use ``bicubic``); ``bicubic`` and
    ``bilinear`` resize the offset map uniformly with ``F.interpolate``. A table already at ``grid``
    is returned as it is.
    """
    check_rel_pos_mode(mode)
    src = table_grid(table.shape[0])
    if tuple(src) == tuple(grid):
        return table
    src_hw = (2 * src[0] - 1, 2 * src[1] - 1)
    dst_hw = (2 * grid[0] - 1, 2 * grid[1] - 1)
    offsets, extra = table[:-3], table[-3:]
    if mode == "geometric":
        if grid[0] != grid[1]:
            raise UserError(f"geometric relative position resizing needs a square patch grid, not {grid[0]}x{grid[1]};"
                            " use the bicubic mode")
        if src[0] < 3:
            raise UserError(f"geometric relative position resizing needs a source grid of at least 3x3 (a cubic "
                            f"spline needs 4 points per axis), not {src[0]}x{src[1]}; use the bicubic mode")
        resized = _geometric_offsets(offsets, src_hw[0], dst_hw[0])
    else:
        resized = _interpolated_offsets(offsets, src_hw, dst_hw, mode)
    return torch.cat((resized.to(dtype=table.dtype, device=table.device), extra), dim=0)


def resize_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Interpolate absolute position embeddings ``[1, 1+h*w, D]`` to another grid (CLS kept)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise UserError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = patches.shape[-1]
    image = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=tuple(grid), mode=mode, align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat((cls, resized), dim=1)


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_pretrained(
    model: BeitEncoder, state_dict: Dict[str, torch.Tensor], rel_pos_interpolation: str = "geometric",
    pos_interpolation: str = "bicubic",
) -> LoadReport:
    """Load pre-trained (or fine-tuned) weights with our key names into a classifier (or any
    :class:`BeitEncoder`, e.g. a segmentation backbone).

    Drops ``mask_token`` and ``lm_head.*``; clones a shared relative position table into every
    layer when the model has per-layer tables; resizes tables (``rel_pos_interpolation``, by
    default the original's geometric scheme) and absolute position embeddings (bicubic, as the
    original) to the model's patch grid; drops a head of another class count. Index buffers are
    recomputed for the model's grid. Any other shape difference raises :class:`UserError` naming the key.
    """
    check_rel_pos_mode(rel_pos_interpolation)  # before any work, even when nothing needs resizing
    report = LoadReport()
    state = _strip_prefix(dict(state_dict))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    dropped = sorted(k for k in state if k.startswith(PRETRAIN_ONLY_PREFIXES))
    for k in dropped:
        del state[k]
    if dropped:
        report.notes.append(f"dropped pre-training-only {', '.join(dropped)}")

    per_layer = [k for k in own if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table")]
    if SHARED_TABLE in state and SHARED_TABLE not in own and per_layer and not any(k in state for k in per_layer):
        shared = state.pop(SHARED_TABLE)
        for k in per_layer:
            state[k] = shared.clone()
        report.notes.append(f"cloned the shared relative position table into each of the {len(per_layer)} layers")

    grid = model.cfg.grid
    for k in list(state):
        if k not in own or state[k].shape == own[k].shape:
            continue
        if k.endswith("relative_position_bias_table") and state[k].shape[1] == own[k].shape[1]:
            src = table_grid(state[k].shape[0])
            state[k] = resize_rel_pos_table(state[k], grid, rel_pos_interpolation)
            report.notes.append(f"resized {k} from a {src[0]}x{src[1]} to a {grid[0]}x{grid[1]} grid "
                                f"({rel_pos_interpolation})")
        elif k == "pos_embed" and state[k].shape[-1] == own[k].shape[-1]:
            state[k] = resize_pos_embed(state[k], grid, pos_interpolation)
            report.notes.append(f"resized pos_embed to a {grid[0]}x{grid[1]} grid")
        elif k.startswith("head."):
            classes = getattr(model, "num_classes", "?")
            report.notes.append(f"dropped {k} {tuple(state.pop(k).shape)} (the model has {classes} classes)")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f"pre-trained weights do not fit the model ({'; '.join(bad[:4])})")
    report.missing = sorted(k for k in own if k not in state and not k.endswith("relative_position_index"))
    lacking = [k for k in report.missing if not (k.startswith(CREATED_PREFIXES) or k.endswith("bias_table"))]
    if lacking:
        more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
        raise UserError(f"the pre-trained weights lack encoder weights: {', '.join(lacking[:4])}{more}")
    report.unused = sorted(k for k in state if k not in own)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report
