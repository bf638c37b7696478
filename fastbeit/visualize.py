"""Look inside a pre-trained BEiT: attention maps and masked-image-modeling reconstructions.

    python -m fastbeit.visualize attention --checkpoint runs/base/checkpoint.pt --image a.jpg --output attn.png
    python -m fastbeit.visualize attention ... --block 5 --patch 7 3     # also what patch (row 7, col 3) attends to
    python -m fastbeit.visualize mim --checkpoint runs/base/checkpoint.pt --image a.jpg b.jpg --output mim.png

``attention``: softmax(q·kᵀ·scale + bias) of one block (default the last), per head, for the CLS
query (and optionally one patch), drawn over the image. The model's attention runs in fused
kernels that never form the probabilities, so a forward pre-hook captures the block's attention
input and the probabilities are recomputed explicitly from it.

``mim``: per image a row of the input, its blockwise mask, the tokenizer's reconstruction of the
image's own tokens, and the reconstruction with the masked tokens replaced by the model's
predictions (argmax over the vocabulary), both decoded by the tokenizer's decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastbeit.checkpoint import load_checkpoint, load_model_state
from fastbeit.config import BeitConfig
from fastbeit.data.folder import read_image
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, IMAGENET_MEAN, IMAGENET_STD, map_pixels
from fastbeit.errors import UserError, cli_entry
from fastbeit.layers import gather_relative_bias, qkv_projection
from fastbeit.masking import MaskingGenerator
from fastbeit.model import Attention, BeitForMaskedImageModeling
from fastbeit.validate import check_output_file, resolve_device

TOKENIZER_DOWNSAMPLE = 8
MIM_KEYS = ("mask_token", "lm_head.weight")


# --- loading ---------------------------------------------------------------------------------


def load_pretraining_model(path: str, device: torch.device) -> Tuple[BeitForMaskedImageModeling, Dict[str, Any]]:
    """The MIM model of a pre-training checkpoint (eval mode) and that run's args."""
    ckpt = load_checkpoint(path)
    state = ckpt["model"]
    if ckpt.get("kind") == "segmentation" or any(k.startswith("backbone.") for k in state):
        raise UserError(f"{path} is a segmentation checkpoint; this needs a pre-training checkpoint")
    missing = [k for k in MIM_KEYS if k not in state]
    if missing or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a pre-training checkpoint (no {', '.join(missing) or 'config'}): "
                        "a fine-tuned model has no MIM head to visualize")
    fields = {f.name for f in dataclasses.fields(BeitConfig)}
    try:
        cfg = BeitConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    except (TypeError, UserError) as exc:
        raise UserError(f"{path} has an unusable model config: {exc}") from None
    model = BeitForMaskedImageModeling(cfg.replace(attn_backend="auto", kernels="auto", drop_path_rate=0.0))
    load_model_state(model, state, path)
    return model.to(device).eval(), ckpt.get("args") or {}


def load_views(path: str, size: int, token_size: int, mean: Sequence[float], std: Sequence[float]):
    """(normalized patch view ``[3, S, S]``, ``map_pixels`` tokenizer view, display image ``[S, S, 3]``):
    the image's centre square, resized twice (bicubic / Lanczos as in pre-training)."""
    img = read_image(path)
    side = min(img.size)
    img = TF.center_crop(img, [side, side])
    view = TF.to_tensor(TF.resize(img, [size, size], InterpolationMode.BICUBIC))
    token_view = TF.to_tensor(TF.resize(img, [token_size, token_size], InterpolationMode.LANCZOS))
    return TF.normalize(view, mean, std), map_pixels(token_view), view.permute(1, 2, 0).numpy()


def mean_std(pre_args: Dict[str, Any]) -> Tuple[Sequence[float], Sequence[float]]:
    if pre_args.get("imagenet_default_mean_and_std"):
        return IMAGENET_MEAN, IMAGENET_STD
    return BEIT_MEAN, BEIT_STD


# --- attention -------------------------------------------------------------------------------


def attention_probabilities(attn: Attention, x: torch.Tensor, shared_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) ``[B, H, N, N]`` for the attention input ``x`` (after norm1); the
    bias is the shared table's (``model.rel_pos_bias()``) plus the layer's own table if it has one."""
    b, n, _ = x.shape
    qkv = qkv_projection(x.float(), attn.qkv.weight.float(), attn.q_bias, attn.v_bias)
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if shared_bias is not None:
        logits = logits + shared_bias
    if attn.relative_position_bias_table is not None:
        logits = logits + gather_relative_bias(attn.relative_position_bias_table, attn.relative_position_index)
    return logits.softmax(dim=-1)


@torch.no_grad()
def block_attention(model: BeitForMaskedImageModeling, images: torch.Tensor, block: int) -> torch.Tensor:
    """Attention probabilities ``[B, H, N+1, N+1]`` of ``block`` for unmasked images."""
    captured: List[torch.Tensor] = []
    attn = model.blocks[block].attn
    handle = attn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        mask = torch.zeros(images.shape[0], model.cfg.num_patches, dtype=torch.bool, device=images.device)
        model.forward_features(images, mask)
    finally:
        handle.remove()
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    return attention_probabilities(attn, captured[0], shared)


def resolve_block(block: int, depth: int) -> int:
    if not -depth <= block < depth:
        raise UserError(f"--block {block} is outside the model's {depth} blocks (0..{depth - 1}, or negative from "
                        "the end)")
    return block % depth


def query_rows(grid: Tuple[int, int], patch: Optional[Sequence[int]]) -> List[Tuple[str, int]]:
    """(title, token index) of the queries to draw: CLS, and the chosen patch (1 + row·w + col)."""
    rows = [("CLS", 0)]
    if patch is not None:
        r, c = patch
        if not (0 <= r < grid[0] and 0 <= c < grid[1]):
            raise UserError(f"--patch {r} {c} is outside the {grid[0]}x{grid[1]} patch grid "
                            f"(rows 0..{grid[0] - 1}, columns 0..{grid[1] - 1})")
        rows.append((f"patch ({r}, {c})", 1 + r * grid[1] + c))
    return rows


def plot_attention(images: Sequence[np.ndarray], probs: torch.Tensor, grid: Tuple[int, int],
                   queries: Sequence[Tuple[str, int]], names: Sequence[str], block: int, path: str) -> None:
    """One row per (image, query): the image, the mean over heads, then each head, as heat maps."""
    plt = _pyplot()
    heads = probs.shape[1]
    rows = [(i, q) for i in range(len(images)) for q in queries]
    cols = heads + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.0 * len(rows)), squeeze=False)
    for ax_row, (i, (title, token)) in zip(axes, rows):
        img = images[i]
        maps = probs[i, :, token, 1:].reshape(heads, *grid)
        maps = torch.cat((maps.mean(0, keepdim=True), maps))
        ax_row[0].imshow(img)
        ax_row[0].set_title(f"{names[i]}\n{title}", fontsize=7)
        if token > 0:
            r, c = divmod(token - 1, grid[1])
            ph, pw = img.shape[0] / grid[0], img.shape[1] / grid[1]
            ax_row[0].add_patch(plt.Rectangle((c * pw, r * ph), pw, ph, fill=False, color="red", lw=1.5))
        for j, (ax, heat) in enumerate(zip(ax_row[1:], maps)):
            ax.imshow(img)
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, interpolation="nearest",
                      extent=(0, img.shape[1], img.shape[0], 0))
            ax.set_title("mean" if j == 0 else f"head {j - 1}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"attention of block {block} (query → patches)", fontsize=9)
    _save(fig, path)


# --- masked image modeling -------------------------------------------------------------------


def load_decoding_tokenizer(path: Optional[str], pre_args: Dict[str, Any], vocab_size: int, device: torch.device):
    """The tokenizer (``--tokenizer``, else the checkpoint's, else the shipped one); it must decode."""
    from fastbeit.tokenizer.dvae import load_tokenizer

    spec = path if path is not None else pre_args.get("tokenizer")
    tokenizer = load_tokenizer(spec).to(device).eval()
    if getattr(tokenizer, "decoder", None) is None:
        raise UserError(f"tokenizer {spec or '(shipped)'} has no decoder (DALL-E's encoder.pkl is encoder-only): "
                        "mim mode needs one to draw tokens; pass a fastbeit tokenizer with --tokenizer")
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"tokenizer {spec or '(shipped)'} has {tokenizer.vocab_size} tokens but the model predicts "
                        f"{vocab_size}: pass the tokenizer it was pre-trained with")
    return tokenizer


def mask_generator(grid: Tuple[int, int], pre_args: Dict[str, Any], num_masked: Optional[int]) -> MaskingGenerator:
    """The run's masking settings, scaled to the grid's patch count when the grid differs from 14×14."""
    patches = grid[0] * grid[1]
    target = num_masked or int(pre_args.get("num_mask_patches") or 75)
    if num_masked is None and patches != 196:
        target = max(1, round(target * patches / 196))
    min_block = min(int(pre_args.get("min_mask_patches_per_block") or 16), target)
    try:
        return MaskingGenerator(grid, target, min_num_patches=min_block)
    except ValueError as exc:
        raise UserError(f"bad masking settings: {exc}") from None


@torch.no_grad()
def mim_reconstructions(model: BeitForMaskedImageModeling, tokenizer, images: torch.Tensor,
                        token_views: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Decoded images ``[B, 3, s, s]`` of the true ids and of ids with the masked ones predicted,
    and the masked-token accuracy per image."""
    grid = model.cfg.grid
    ids = tokenizer.encode(token_views).flatten(1)
    logits = model(images, mask, return_all_tokens=True)
    predicted = torch.where(mask, logits.argmax(-1), ids)
    hits = ((predicted == ids) & mask).sum(1).float() / mask.sum(1).clamp(min=1)
    shape = (-1, *grid)
    return {"tokens": tokenizer.decode(ids.view(shape)), "predicted": tokenizer.decode(predicted.view(shape)),
            "accuracy": hits}


def masked_display(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with masked patches greyed out."""
    h, w = mask.shape
    cover = np.kron(mask, np.ones((image.shape[0] // h, image.shape[1] // w)))[..., None]
    return image * (1 - cover) + 0.5 * cover


def plot_mim(images: Sequence[np.ndarray], masks: np.ndarray, recon: Dict[str, torch.Tensor],
             names: Sequence[str], path: str) -> None:
    plt = _pyplot()
    titles = ("input", "mask", "tokenizer reconstruction", "masked tokens predicted")
    fig, axes = plt.subplots(len(images), 4, figsize=(10, 2.7 * len(images)), squeeze=False)
    for i, ax_row in enumerate(axes):
        decoded = [recon[k][i].permute(1, 2, 0).cpu().numpy() for k in ("tokens", "predicted")]
        panels = (images[i], masked_display(images[i], masks[i]), *decoded)
        for j, (ax, panel) in enumerate(zip(ax_row, panels)):
            ax.imshow(np.clip(panel, 0, 1))
            ax.axis("off")
            title = titles[j] if i == 0 else ""
            if j == 0:
                title = f"{names[i]}\n{title}".strip()
            if j == 1:
                title = f"{title}\n{int(masks[i].sum())} of {masks[i].size} masked".strip()
            if j == 3:
                title = f"{title}\nmasked-token acc {100 * float(recon['accuracy'][i]):.1f}%".strip()
            ax.set_title(title, fontsize=8)
    _save(fig, path)


# --- plotting helpers ------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)


# --- CLI -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastbeit.visualize",
                                     description="Attention maps and MIM reconstructions of a pre-trained BEiT.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{attention,mim}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="a fastbeit pre-training checkpoint")
        p.add_argument("--image", nargs="+", required=True, metavar="PATH")
        p.add_argument("--output", required=True, metavar="PNG")
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    attn = modes.add_parser("attention", help="self-attention maps of one block, per head")
    common(attn)
    attn.add_argument("--block", type=int, default=-1, help="block index (negative counts from the end)")
    attn.add_argument("--patch", type=int, nargs=2, default=None, metavar=("ROW", "COL"),
                      help="also draw what this patch attends to")
    mim = modes.add_parser("mim", help="masked tokens predicted by the model, decoded by the tokenizer")
    common(mim)
    mim.add_argument("--tokenizer", default=None, help="tokenizer with a decoder (default: the checkpoint's)")
    mim.add_argument("--num_mask_patches", "--num-mask-patches", type=int, default=None,
                     help="masked patches per image (default: the run's, scaled to the grid)")
    mim.add_argument("--seed", type=int, default=0)
    return parser


def run_attention(args: argparse.Namespace, model, pre_args, device) -> str:
    cfg = model.cfg
    block = resolve_block(args.block, cfg.depth)
    queries = query_rows(cfg.grid, args.patch)
    mean, std = mean_std(pre_args)
    views = [load_views(p, cfg.img_size, TOKENIZER_DOWNSAMPLE * cfg.grid[0], mean, std) for p in args.image]
    images = torch.stack([v[0] for v in views]).to(device)
    probs = block_attention(model, images, block).cpu()
    plot_attention([v[2] for v in views], probs, cfg.grid, queries, [Path(p).name for p in args.image], block,
                   args.output)
    return f"wrote attention maps of block {block} ({probs.shape[1]} heads) for {len(views)} image(s) to {args.output}"


def run_mim(args: argparse.Namespace, model, pre_args, device) -> str:
    cfg = model.cfg
    tokenizer = load_decoding_tokenizer(args.tokenizer, pre_args, cfg.vocab_size, device)
    gen = mask_generator(cfg.grid, pre_args, args.num_mask_patches)
    mean, std = mean_std(pre_args)
    views = [load_views(p, cfg.img_size, TOKENIZER_DOWNSAMPLE * cfg.grid[0], mean, std) for p in args.image]
    rng = random.Random(args.seed)
    masks = np.stack([gen(rng) for _ in views])
    mask = torch.from_numpy(masks).flatten(1).bool().to(device)
    images = torch.stack([v[0] for v in views]).to(device)
    token_views = torch.stack([v[1] for v in views]).to(device)
    recon = mim_reconstructions(model, tokenizer, images, token_views, mask)
    plot_mim([v[2] for v in views], masks, recon, [Path(p).name for p in args.image], args.output)
    acc = 100 * float(recon["accuracy"].mean())
    return f"wrote MIM reconstructions of {len(views)} image(s) to {args.output} (masked-token accuracy {acc:.1f}%)"


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(resolve_device(args.device))
    check_output_file(args.output)
    for path in args.image:
        read_image(path)  # every image readable before the model loads
    model, pre_args = load_pretraining_model(args.checkpoint, device)
    run = run_attention if args.mode == "attention" else run_mim
    print(run(args, model, pre_args, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
