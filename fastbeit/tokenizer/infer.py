"""The tokenizer's inference form for pre-training: same ids, less work, its own precision.

Built once from a loaded :class:`~fastbeit.tokenizer.dvae.DiscreteVAE` (ours or DALL-E's
``encoder.pkl``), frozen:

* each residual block's ``post_gain`` is folded into the last conv of its residual path (weight and
  bias scaled once), so the step no longer multiplies every activation by it. ``post_gain`` is
  ``1 / (4·blocks)²``: a power of two for 1, 2 or 4 blocks per group (ours and DALL-E's), and
  scaling by a power of two is exact in floating point, so the fp32 logits are bit-identical;
  other block counts fold to within an ulp;
* weights (and inputs) channels-last on CUDA, where NHWC convolutions are faster; ReLU and the
  residual adds are left to ``torch.compile`` (``compile=True``) to fuse;
* the final ReLU, 1×1 conv and argmax are one pass (:func:`fastbeit.kernels.token_argmax`) that
  never writes the ``[B, vocab, h, w]`` logits and keeps them in fp32 whatever the precision;
* ``encode`` runs at the tokenizer's own precision (``fp32``, ``tf32`` or ``bf16``) with the
  caller's autocast switched off: the original ran the tokenizer in fp32, outside autocast.

Precisions: ``fp32`` is IEEE fp32 everywhere (cuDNN's default TF32 for convolutions is switched
off inside ``encode``); ``tf32`` lets CUDA convolutions and matmuls use TF32 tensor cores (on a CPU
it is fp32: there is no TF32 there); ``bf16`` keeps bf16 weights and activations, fp32 logits.
How often each agrees with the fp32 ids: ``benchmarks/results/*tokenizer_precision*.md``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from torch import nn

from fastbeit.compiled import CompiledStep
from fastbeit.errors import UserError
from fastbeit.kernels import use_triton
from fastbeit.tokenizer.dvae import DOWNSAMPLE, DiscreteVAE, DVAEConfig, Encoder, ResBlock

PRECISIONS = ("fp32", "tf32", "bf16")
# The fastest precision whose ids agree with fp32's on >= 99.5 % of positions (measured on real
# photos: benchmarks/results/2026-12-03_tokenizer_precision.md).
DEFAULT_PRECISION = "tf32"
HEADS = ("auto", "triton", "torch")


@contextlib.contextmanager
def fp32_math(precision: str) -> Iterator[None]:
    """CUDA convolutions and matmuls on fp32 tensors in IEEE fp32 (``fp32``) or TF32 (``tf32``),
    restored on exit. A no-op for ``bf16`` (16-bit operands ignore the setting)."""
    if precision == "bf16":
        yield
        return
    tf32 = precision == "tf32"
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: fp32_precision "ieee" / "tf32"
        owners = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
        name, value = "fp32_precision", "tf32" if tf32 else "ieee"
    else:
        owners = (torch.backends.cudnn, torch.backends.cuda.matmul)
        name, value = "allow_tf32", tf32
    saved = [getattr(o, name) for o in owners]
    for o in owners:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, v in zip(owners, saved):
            setattr(o, name, v)


def fold_post_gain(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` whose residual blocks compute ``id_path(x) + res_path(x)``: each
    block's ``post_gain`` multiplied into the weight and bias of its residual path's last conv."""
    folded = copy.deepcopy(encoder)
    for block in folded.modules():
        if isinstance(block, ResBlock) and block.post_gain != 1:
            last = [m for m in block.res_path if isinstance(m, nn.Conv2d)][-1]
            with torch.no_grad():
                last.weight.mul_(block.post_gain)
                last.bias.mul_(block.post_gain)
            block.post_gain = 1
    return folded


class _FoldedBody(nn.Module):
    """Every encoder layer but the output ReLU + 1×1 conv, with ``post_gain`` already folded."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.input = encoder.blocks.input
        self.blocks = nn.ModuleList()
        for group in list(encoder.blocks)[1:-1]:
            self.blocks.extend(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        for layer in self.blocks:
            x = layer.id_path(x) + layer.res_path(x) if isinstance(layer, ResBlock) else layer(x)
        return x


class InferenceTokenizer(nn.Module):
    """A frozen tokenizer's encoder for pre-training: ``encode(images) -> ids [B, h, w]`` (int64).

    ``head``: ``triton`` = the fused ReLU + 1×1 conv + argmax kernel, ``torch`` = its PyTorch
    reference (row chunks, so the logits never exist whole either), ``auto`` = triton on CUDA.
    ``fold=False`` keeps ``post_gain`` as a multiply (the ablation's unfolded form).
    """

    def __init__(self, model: DiscreteVAE, precision: str = DEFAULT_PRECISION, head: str = "auto",
                 channels_last: Optional[bool] = None, compile: bool = False, fold: bool = True) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise UserError(f"unknown tokenizer precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if head not in HEADS:
            raise UserError(f"unknown tokenizer head {head!r}; choose from {', '.join(HEADS)}")
        self.config: DVAEConfig = model.config
        self.precision = precision
        encoder = fold_post_gain(model.encoder) if fold else copy.deepcopy(model.encoder)
        device = next(encoder.parameters()).device
        self.body = _FoldedBody(encoder) if fold else encoder.blocks[:-1]
        out = encoder.blocks.output.conv
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.body.to(dtype=dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.register_buffer("head_weight", out.weight.detach().flatten(1).to(dtype).contiguous(), persistent=False)
        self.register_buffer("head_bias", out.bias.detach().float().contiguous(), persistent=False)
        self.head = ("triton" if device.type == "cuda" else "torch") if head == "auto" else head
        if self.head == "triton" and not use_triton(out.weight):
            raise UserError("the fused tokenizer head needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        self.eval().requires_grad_(False)
        # not a submodule: the compiled wrapper shares self.body's parameters
        body = CompiledStep(self.body, what="the tokenizer", dynamic=False) if compile else self.body
        object.__setattr__(self, "_run_body", body)

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_images(self, shape: torch.Size | tuple) -> None:
        """:class:`UserError` unless ``shape`` is ``[B, channels, S, S']`` with sides multiples of 8."""
        c = self.config.input_channels
        if len(shape) != 4 or shape[1] != c:
            raise UserError(f"the tokenizer takes images [B, {c}, H, W], got {tuple(shape)}")
        if any(s < DOWNSAMPLE or s % DOWNSAMPLE for s in shape[2:]):
            raise UserError(f"the tokenizer cannot take {shape[2]}x{shape[3]} px images: each side must be a "
                            f"positive multiple of {DOWNSAMPLE} (it down-samples {DOWNSAMPLE}x to one id per patch)")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last ReLU's input ``[B, C, h, w]`` at the tokenizer's precision (the caller's autocast off)."""
        self.check_images(images.shape)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = images.to(self.dtype).contiguous(memory_format=fmt)
        with torch.autocast(images.device.type, enabled=False), fp32_math(self.precision):
            return self._run_body(x)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, h, w]`` (int64) of ``map_pixels``'d images ``[B, 3, H, W]``."""
        feats = self.features(images)
        B, C, h, w = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(B * h * w, C)  # a view when channels-last
        from fastbeit.kernels.token_argmax import token_argmax

        with torch.autocast(images.device.type, enabled=False), fp32_math(self.precision):
            ids = token_argmax(rows, self.head_weight, self.head_bias, relu=True,
                               impl="triton" if self.head == "triton" else "reference")
        return ids.view(B, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """BEiT's name for :meth:`encode`."""
        return self.encode(images)


def _check_kind(spec: Optional[str | os.PathLike]) -> None:
    """A named file that cannot be a tokenizer (a checkpoint, an image, DALL-E's decoder) fails here."""
    if spec is None:
        return
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise UserError(f"{path} looks like a model checkpoint, not a tokenizer: pass a fastbeit tokenizer "
                        ".safetensors (python -m fastbeit.tokenizer.train makes one) or DALL-E's encoder.pkl")
    if path.suffix == ".pkl" and "decoder" in path.stem.lower():
        raise UserError(f"{path} is DALL-E's decoder; the tokenizer is the encoder: pass encoder.pkl")
    if path.suffix not in (".safetensors", ".json", ".pkl"):
        raise UserError(f"{path} is not a tokenizer file: expected a fastbeit .safetensors (or its .json) "
                        "or DALL-E's encoder.pkl")


def build_tokenizer(spec: Optional[str | os.PathLike], device: str | torch.device = "cpu",
                    precision: str = DEFAULT_PRECISION, *, vocab_size: Optional[int] = None,
                    image_size: Optional[int] = None, compile: bool = False,
                    head: str = "auto") -> InferenceTokenizer:
    """Load a tokenizer (``None``: the shipped one) and build its frozen inference form on ``device``.

    ``vocab_size`` / ``image_size``, when given, are checked here, before any work: the model's
    vocabulary must be the tokenizer's, and images must have sides that are multiples of 8.
    """
    from fastbeit.tokenizer.dvae import load_tokenizer

    if precision not in PRECISIONS:
        raise UserError(f"unknown tokenizer precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    _check_kind(spec)
    model = load_tokenizer(spec).to(device)
    name = spec or "(the shipped tokenizer)"
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer {name} has a vocabulary of {model.config.vocab_size} ids but the model "
                        f"predicts {vocab_size}: use the tokenizer the model was built for")
    tok = InferenceTokenizer(model, precision, head=head, compile=compile)
    if image_size is not None:
        tok.check_images((1, model.config.input_channels, image_size, image_size))
    return tok


def module_ids(model: DiscreteVAE, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The unfolded module's fp32 ids (``argmax`` of its logits), in batches: the reference."""
    out: List[torch.Tensor] = []
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False), fp32_math("fp32"):
        for i in range(0, images.shape[0], batch):
            out.append(model.encode(images[i:i + batch].float()))
    return torch.cat(out)
