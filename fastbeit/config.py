"""Model configuration and the named presets (tiny, small, base, large)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from fastbeit.errors import UserError

ATTN_BACKENDS = ("auto", "eager", "sdpa", "triton", "xformers", "flash")
KERNEL_IMPLS = ("auto", "triton", "reference")


@dataclass
class BeitConfig:
    """Every knob of the BEiT encoder; defaults are the original BEiT-Base pre-training ones."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    init_values: Optional[float] = 0.1  # LayerScale; None or 0 disables it
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = False  # one table per layer
    use_shared_rel_pos_bias: bool = True  # one table for all layers (pre-training default)
    vocab_size: int = 8192
    init_std: float = 0.02
    layer_norm_eps: float = 1e-6
    attn_backend: str = "auto"
    kernels: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid(self) -> Tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def layer_scale(self) -> bool:
        return self.init_values is not None and self.init_values > 0

    def validate(self) -> None:
        """Raise :class:`UserError` for settings that cannot build a model."""
        if self.patch_size <= 0 or self.img_size <= 0:
            raise UserError(f"image size and patch size must be positive (got {self.img_size}, {self.patch_size})")
        if self.img_size % self.patch_size:
            raise UserError(
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise UserError(f"unknown attention backend {self.attn_backend!r}; choose from {ATTN_BACKENDS}")
        if self.kernels not in KERNEL_IMPLS:
            raise UserError(f"unknown kernels {self.kernels!r}; choose from {KERNEL_IMPLS}")
        if self.use_rel_pos_bias and self.use_shared_rel_pos_bias:
            raise UserError("choose per-layer or shared relative position bias, not both")
        if not 0 <= self.drop_path_rate < 1:
            raise UserError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> BeitConfig:
        return dataclasses.replace(self, **changes)


PRESETS: Dict[str, Dict[str, Any]] = {
    "beit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "beit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "beit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "beit_large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}

# The original code's model names (pre-training, then fine-tuning), accepted as aliases of the presets;
# the patch size, image size and vocabulary in the name are what the flags' defaults give.
ORIGINAL_NAMES: Dict[str, str] = {
    "beit_base_patch16_224_8k_vocab": "beit_base",
    "beit_large_patch16_224_8k_vocab": "beit_large",
    "beit_base_patch16_224": "beit_base",
    "beit_base_patch16_384": "beit_base",
    "beit_large_patch16_224": "beit_large",
    "beit_large_patch16_384": "beit_large",
    "beit_large_patch16_512": "beit_large",
}


def preset_of(name: str) -> str:
    """The preset a model name means: a preset itself, or an alias from :data:`ORIGINAL_NAMES`."""
    name = ORIGINAL_NAMES.get(name, name)
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)} (or an original name: "
                        f"{', '.join(ORIGINAL_NAMES)})")
    return name


# The paper's plain-ViT setting: absolute positions, no LayerScale, no relative position bias.
PLAIN_VIT = dict(use_abs_pos_emb=True, init_values=None, use_shared_rel_pos_bias=False, use_rel_pos_bias=False)


def make_config(name: str, **overrides: Any) -> BeitConfig:
    """A preset by name (or an original model name) with fields overridden (``None`` values are ignored)."""
    name = preset_of(name)
    fields = {f.name for f in dataclasses.fields(BeitConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown config fields {sorted(unknown)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BeitConfig(**values)
