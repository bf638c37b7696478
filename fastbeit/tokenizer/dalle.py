"""Load DALL-E's released dVAE encoder (``encoder.pkl``) into our :class:`DiscreteVAE`.

The release pickles a whole ``dall_e.Encoder`` module, so reading it runs the unpickler with
``weights_only=False``: arbitrary code in the file can execute. Only load a file you trust, and
only one the user names; this module never fetches anything. The ``dall_e`` package (and
``attrs``, which it needs but does not declare) must be importable for the classes to resolve.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import torch

from fastbeit.errors import UserError
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig


def _unpickle(path: Path) -> object:
    try:
        import dall_e  # noqa: F401  (the pickle refers to dall_e.encoder.Encoder)
    except ImportError as exc:
        raise UserError(
            f"loading {path} needs the 'dall_e' package (pip install dall-e attrs): {exc}"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling can fail in many ways for a wrong file
        raise UserError(f"{path} is not a readable DALL-E encoder pickle: {exc}") from None


def dalle_state_dict(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """DALL-E's ``blocks...conv_1.w`` / ``.b`` → our ``encoder.blocks...conv_1.weight`` / ``.bias``."""
    out = {}
    for name, tensor in params.items():
        stem, _, leaf = name.rpartition(".")
        if leaf not in ("w", "b"):
            raise UserError(f"unexpected parameter {name!r} in the DALL-E encoder")
        out[f"encoder.{stem}.{'weight' if leaf == 'w' else 'bias'}"] = tensor.detach().float().cpu()
    return out


def infer_config(state: Dict[str, torch.Tensor], image_size: int = 112) -> DVAEConfig:
    """n_hid, blocks per group and vocab size, read off the tensor shapes."""
    try:
        n_hid, in_ch = state["encoder.blocks.input.weight"].shape[:2]
        vocab = state["encoder.blocks.output.conv.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"the DALL-E encoder lacks parameter {exc}") from None
    blocks = {k.split(".")[3] for k in state if k.startswith("encoder.blocks.group_1.block_")}
    return DVAEConfig(n_hid=int(n_hid), n_blk_per_group=len(blocks), vocab_size=int(vocab),
                      image_size=image_size, input_channels=int(in_ch), decoder=False)


def load_dalle_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                       image_size: int = 112) -> DiscreteVAE:
    """An encoder-only, frozen :class:`DiscreteVAE` holding DALL-E's encoder weights.

    Its ``encode(x)`` equals ``torch.argmax(dall_e_encoder(x), dim=1)``. Unpickles ``path``
    (``weights_only=False``): pass only a file you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DALL-E encoder file {path} not found")
    module = _unpickle(path)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"{path} holds a {type(module).__name__}, not a DALL-E encoder module")
    state = dalle_state_dict(dict(module.named_parameters()))
    model = DiscreteVAE(infer_config(state, image_size))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{path} does not have the DALL-E encoder layout: {detail}") from None
    return model.to(device).eval().requires_grad_(False)
