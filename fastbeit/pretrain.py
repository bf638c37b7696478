"""BEiT pre-training by masked image modeling.

    python -m fastbeit.pretrain --amp bf16                       # built-in sample, beit_tiny, CPU ok
    python -m fastbeit.pretrain --data DIR --model beit_base --batch-size 128 --output runs/x
    torchrun --nproc-per-node 8 -m fastbeit.pretrain --data DIR ...   # DDP

Each step: two views + mask → tokenizer ids (no grad) → model on the masked patches → mean
cross entropy over masked tokens. AdamW with the original decay groups, per-step cosine
schedule with linear warmup from 0, gradient clipping, bf16/fp16 autocast, atomic checkpoints
(Ctrl-C saves one first), ``--resume`` with the schedule, optimizer, scaler and RNG state.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastbeit.checkpoint import (
    atomic_save,
    check_same_architecture,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from fastbeit.cli import (
    NonFiniteLoss,
    add_overwrite_flag,
    add_run_flags,
    amp_context,
    flag_adder,
    save_after_interrupt,
    save_checkpoint_or_warn,
    start_run,
    tell_interrupted,
    tell_non_finite,
    whole_step,
)
from fastbeit.compiled import COMPILE_MODES, CompiledStep
from fastbeit.config import ATTN_BACKENDS, KERNEL_IMPLS, PRESETS, make_config
from fastbeit.data.folder import ImageFolderDataset, ImageLoader
from fastbeit.data.sampler import ResumableSampler
from fastbeit.data.shard import is_shard_source, resolve_shards
from fastbeit.data.shard_loader import SampleDecoder, ShardLoader
from fastbeit.data.transforms import (
    BEIT_MEAN,
    BEIT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    BeitPretrainTransform,
    TwoViewTransform,
)
from fastbeit.distributed import DistInfo, all_reduce_mean, leaving_group_after
from fastbeit.errors import UserError, cli_entry
from fastbeit.logging_utils import JsonlLogger, plot_curves, preload_plotting, read_jsonl
from fastbeit.masking import MASKING_MODES, MaskingGenerator
from fastbeit.model import BeitForMaskedImageModeling
from fastbeit.optim import build_adamw, cosine_schedule, decay_groups, no_decay_names, set_step_values
from fastbeit.rundir import claim_output
from fastbeit.tokenizer.infer import DEFAULT_PRECISION, PRECISIONS, InferenceTokenizer
from fastbeit.tokenizer.infer import build_tokenizer as build_inference_tokenizer
from fastbeit.validate import FlagChecks, check_output_dir, resolve_device

TOKENIZER_DOWNSAMPLE = 8
SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "sample"
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "curves.png")  # what a run writes in --output

# Defaults of the faithful recipe (DESIGN.md §3) for real data, and of the built-in demo.
RECIPE_DEFAULTS: Dict[str, Any] = dict(
    model="beit_base", batch_size=64, epochs=800, lr=1.5e-3, warmup_epochs=10, num_workers=10,
    output="runs/pretrain",
)
DEMO_DEFAULTS: Dict[str, Any] = dict(
    model="beit_tiny", batch_size=16, epochs=4, lr=1.5e-3, warmup_epochs=1, num_workers=2,
    output="runs/demo",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastbeit.pretrain",
        description="BEiT masked-image-modeling pre-training (runs on a built-in sample without --data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    add = flag_adder(p)
    g = p.add_argument_group("data")
    add("--data", "--data_path", default=None, help="image folder (recursive); default: built-in sample")
    add("--input_size", type=int, default=224, help="patch-view size")
    add("--second_input_size", type=int, default=112, help="tokenizer-view size")
    add("--imagenet_default_mean_and_std", action="store_true", help="ImageNet mean/std instead of 0.5")
    add("--color_jitter", type=float, default=0.4)
    add("--train_interpolation", default="bicubic")
    add("--second_interpolation", default="lanczos")
    add("--num_workers", type=int, default=None)
    add("--loader", choices=("auto", "torch", "dali"), default="auto",
        help="data loader: dali decodes and augments on the GPU; auto = dali on CUDA when installed, else torch")
    del g

    add("--model", default=None,
        help=f"one of {', '.join(PRESETS)} or an original name (e.g. beit_base_patch16_224_8k_vocab)")
    add("--patch_size", type=int, default=16)
    add("--depth", type=int, default=None, help="override the preset's depth (small experiments)")
    add("--drop_path", type=float, default=0.1)
    add("--layer_scale_init_value", type=float, default=0.1, help="0 disables LayerScale")
    # Position-bias flags with the original pre-training script's meanings (DESIGN.md §3).
    add("--rel_pos_bias", action="store_true", help="one relative position table shared by all layers (the default)")
    add("--disable_rel_pos_bias", action="store_true", help="no relative position bias at all")
    add("--per_layer_rel_pos_bias", action="store_true", help="one relative position table per layer instead")
    add("--disable_shared_rel_pos_bias", action="store_true", help="no shared relative position table")
    add("--disable_weight_decay_on_rel_pos_bias", action="store_true", help="no weight decay on position tables")
    add("--abs_pos_emb", action="store_true", help="absolute position embedding")
    add("--attn", choices=ATTN_BACKENDS, default="auto", help="attention backend")
    add("--kernels", choices=KERNEL_IMPLS, default="auto", help="fused Triton kernels or references")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the step as one graph (default: on CUDA; --no-compile runs eagerly)")
    add("--compile_mode", choices=COMPILE_MODES, default="default",
        help="torch.compile mode; reduce-overhead replays the step as CUDA graphs")

    add("--tokenizer", "--discrete_vae_weight_path", default=None,
        help="tokenizer: a fastbeit .safetensors file, DALL-E's encoder.pkl or a folder holding it (unpickled: only "
        "a file you trust); default: the small one shipped in the package")
    add("--discrete_vae_type", choices=("dall-e",), default="dall-e", help="the original's flag (DALL-E's is read)")
    add("--tokenizer_precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
        help="the tokenizer's own precision, whatever --amp (the original: fp32); its ids agree with fp32's on "
        "99.9%% (tf32, emulated) and 98.6%% (bf16) of real-photo patches; tf32 is fp32 on a CPU")

    add("--target", choices=("tokens", "pixels"), default="tokens",
        help="what masked patches predict: visual tokens (BEiT) or normalized pixels (the paper's ablation)")
    add("--num_mask_patches", type=int, default=75)
    add("--min_mask_patches_per_block", type=int, default=16)
    add("--max_mask_patches_per_block", type=int, default=None)
    add("--mask_mode", choices=MASKING_MODES, default="blockwise",
        help="blockwise (faithful), exact (topped up to num_mask_patches: static shapes), random")
    add("--mask_sampler", choices=("auto", "cpu", "gpu"), default="auto",
        help="where masks are drawn: gpu = one Triton launch per batch (same distribution); "
        "auto = gpu with the DALI loader, else the CPU generator in the data workers")

    add("--batch_size", type=int, default=None, help="per process")
    add("--epochs", type=int, default=None)
    add("--max_steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    add("--lr", type=float, default=None)
    add("--min_lr", type=float, default=1e-5)
    add("--warmup_lr", type=float, default=0.0)
    add("--warmup_epochs", type=float, default=None)
    add("--warmup_steps", type=int, default=-1)
    add("--weight_decay", type=float, default=0.05)
    add("--weight_decay_end", type=float, default=None)
    add("--opt_eps", type=float, default=1e-8)
    add("--opt_betas", type=float, nargs=2, default=(0.9, 0.999))
    add("--clip_grad", type=float, default=3.0, help="max grad norm (0 disables)")
    add("--amp", choices=("bf16", "fp16", "none"), default="bf16")

    add("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT/checkpoint.pt")
    add("--save_ckpt_freq", type=int, default=1, help="epochs between checkpoints")
    add("--log_every", type=int, default=10, help="steps between metric logs (host syncs)")
    add_run_flags(add, None)
    add_overwrite_flag(add)
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.demo = args.data is None
    for key, value in (DEMO_DEFAULTS if args.demo else RECIPE_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.demo:
        args.data = str(SAMPLE_DIR)
    check_pretrain_flags(args)
    if args.input_size % args.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
    grid = args.input_size // args.patch_size
    if args.second_input_size != TOKENIZER_DOWNSAMPLE * grid:
        raise UserError(
            f"--second_input_size must be {TOKENIZER_DOWNSAMPLE * grid} for a {grid}x{grid} patch grid (got "
            f"{args.second_input_size}): the tokenizer down-samples {TOKENIZER_DOWNSAMPLE}x to one token per patch"
        )
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def check_pretrain_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, the device and the output folder usable (before any work)."""
    checks = FlagChecks(args)
    checks.positive("lr", "batch_size", "epochs", "log_every", "save_ckpt_freq", "patch_size", "depth", "input_size",
                    "second_input_size", "max_steps", "opt_eps")
    checks.non_negative("num_workers", "weight_decay", "weight_decay_end", "clip_grad", "color_jitter", "min_lr",
                        "warmup_lr", "warmup_epochs", "layer_scale_init_value", "num_mask_patches")
    checks.within("opt_betas", 0, 1, high_open=True)
    checks.within("drop_path", 0, 1, high_open=True)
    checks.choice("train_interpolation", INTERPOLATIONS)
    checks.choice("second_interpolation", INTERPOLATIONS)
    args.device = resolve_device(args.device)
    check_output_dir(args.output)


def build_model(args: argparse.Namespace, vocab_size: int) -> BeitForMaskedImageModeling:
    cfg = make_config(
        args.model,
        img_size=args.input_size,
        patch_size=args.patch_size,
        drop_path_rate=args.drop_path,
        init_values=args.layer_scale_init_value,
        use_rel_pos_bias=args.per_layer_rel_pos_bias and not args.disable_rel_pos_bias,
        use_shared_rel_pos_bias=not (args.disable_rel_pos_bias or args.disable_shared_rel_pos_bias
                                     or args.per_layer_rel_pos_bias),
        use_abs_pos_emb=args.abs_pos_emb,
        vocab_size=vocab_size,
        attn_backend=args.attn,
        kernels=args.kernels,
        depth=args.depth,
    )
    return BeitForMaskedImageModeling(cfg)


def build_tokenizer(spec: Optional[str], device: torch.device, precision: str = DEFAULT_PRECISION,
                    **kwargs) -> InferenceTokenizer:
    """The frozen tokenizer's inference form (see :mod:`fastbeit.tokenizer.infer`): ours (.safetensors)
    or DALL-E's pickled ``encoder.pkl`` (or the original's folder holding it); ``encode`` runs at
    ``precision`` whatever the step's autocast."""
    if spec is not None and Path(spec).is_dir():  # the original's --discrete_vae_weight_path folder
        spec = str(Path(spec) / "encoder.pkl")
    return build_inference_tokenizer(spec, device, precision, **kwargs)


def build_mask_generator(args: argparse.Namespace, grid: int) -> MaskingGenerator:
    try:
        return MaskingGenerator(
            (grid, grid),
            num_masking_patches=args.num_mask_patches,
            min_num_patches=args.min_mask_patches_per_block,
            max_num_patches=args.max_mask_patches_per_block,
            mode=args.mask_mode,
        )
    except ValueError as exc:
        raise UserError(f"bad masking settings: {exc}") from None


class LoaderBundle:
    """What the loop needs from a data loader, whichever kind it is."""

    def __init__(self, loader, set_epoch, steps_per_epoch: int, num_images: int, name: str) -> None:
        self.loader, self.set_epoch = loader, set_epoch
        self.steps_per_epoch, self.num_images, self.name = steps_per_epoch, num_images, name

    def state(self) -> Optional[Dict[str, Any]]:
        """The loader layout a mid-epoch resume needs unchanged (shard loaders; None otherwise)."""
        return self.loader.state() if hasattr(self.loader, "state") else None

    def check_resume(self, saved: Optional[Dict[str, Any]]) -> Optional[str]:
        return self.loader.check_resume(saved) if hasattr(self.loader, "check_resume") else None


def choose_loader(requested: str, device: str) -> str:
    from fastbeit.data.dali import dali_available

    if requested == "auto":
        return "dali" if device.startswith("cuda") and dali_available() else "torch"
    if requested == "dali" and not dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install '.[dali]'")
    return requested


def build_loader(args, mask_gen: Optional[MaskingGenerator], dist_info: DistInfo) -> LoaderBundle:
    """The torchvision DataLoader (CPU workers) or the DALI pipeline (GPU decode)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_mean_and_std else (BEIT_MEAN, BEIT_STD)
    kind = choose_loader(args.loader, args.device)
    shards = resolve_shards(args.data) if is_shard_source(args.data) else None
    if kind == "dali":
        from fastbeit.data.dali import DaliPretrainLoader

        device = torch.device(args.device)
        common = dict(batch_size=args.batch_size, input_size=args.input_size,
                      second_input_size=args.second_input_size, color_jitter=args.color_jitter, mean=mean, std=std,
                      device_id=(device.index or 0) if device.type == "cuda" else None,
                      num_threads=max(1, args.num_workers), shard_id=dist_info.rank,
                      num_shards=dist_info.world_size, seed=args.seed)
        if shards is not None:
            from fastbeit.data.dali_shards import DaliShardLoader

            loader = DaliShardLoader(shards, **common)
            return LoaderBundle(loader, loader.set_epoch, len(loader), shards.total, "dali shards")
        loader = DaliPretrainLoader(args.data, progress=dist_info.is_main and not args.no_progress, **common)
        if len(loader) == 0:
            raise UserError(f"the images under {args.data} give no full batch of {args.batch_size} per process")
        return LoaderBundle(loader, loader.set_epoch, len(loader), loader.num_samples * dist_info.world_size, kind)
    views = TwoViewTransform(
        args.input_size, args.second_input_size, args.color_jitter,
        interpolation=args.train_interpolation, second_interpolation=args.second_interpolation, mean=mean, std=std,
    )
    if shards is not None:
        loader = ShardLoader(shards, SampleDecoder(BeitPretrainTransform(views, mask_gen)), args.batch_size,
                             rank=dist_info.rank, world_size=dist_info.world_size, num_workers=args.num_workers,
                             seed=args.seed, pin_memory=args.device.startswith("cuda"), report=dist_info.is_main)
        return LoaderBundle(loader, loader.set_epoch, len(loader), shards.total, "torch shards")
    dataset = ImageFolderDataset(args.data, BeitPretrainTransform(views, mask_gen))
    sampler = ResumableSampler(len(dataset), args.batch_size, args.seed, dist_info.rank, dist_info.world_size)
    if sampler.batches_per_epoch() == 0:
        raise UserError(
            f"{len(dataset)} images give no full batch of {args.batch_size} per process; lower --batch_size"
        )
    loader = ImageLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=args.device.startswith("cuda"), drop_last=True,
    )
    return LoaderBundle(loader, sampler.set_epoch, sampler.batches_per_epoch(), len(dataset), kind)


def save_checkpoint(path: Path, model, optimizer, scaler, args, epoch: int, step_in_epoch: int,
                    global_step: int, reason: str, data_state: Optional[Dict[str, Any]] = None) -> None:
    raw = model
    atomic_save(
        {
            "model": raw.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "config": raw.cfg.to_dict(),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "rng": rng_state(),
            "reason": reason,
            "data": data_state,
        },
        path,
    )


class LossModule(torch.nn.Module):
    """``forward`` = the model's ``forward_loss``, so DDP and torch.compile wrap the whole step."""

    def __init__(self, model: BeitForMaskedImageModeling) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, mask, token_ids: Optional[torch.Tensor], max_masked: Optional[int] = None):
        if token_ids is None:
            out = self.model.forward_pixel_loss(images, mask, max_masked)
        else:
            out = self.model.forward_loss(images, mask, token_ids, max_masked)
        return out.loss, out.mlm_acc


class Trainer:
    """Holds the run's state; ``train()`` runs epochs and handles interrupts and bad losses."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dist, self.device = start_run(args)

        self.out = Path(args.output)
        self.ckpt_path = self.out / "checkpoint.pt"
        if args.target == "tokens":
            self.tokenizer = build_tokenizer(args.tokenizer, self.device, args.tokenizer_precision,
                                             image_size=args.second_input_size, compile=args.compile)
            vocab = int(self.tokenizer.config.vocab_size)
        else:
            self.tokenizer, vocab = None, 3 * args.patch_size**2
        self.model = build_model(args, vocab).to(self.device)
        self.cfg = self.model.cfg
        self.mask_gen = build_mask_generator(args, self.cfg.grid[0])
        self.max_masked = args.num_mask_patches  # no mask mode masks more: the loss gathers this many rows
        if args.mask_sampler == "auto":
            args.mask_sampler = "gpu" if choose_loader(args.loader, args.device) == "dali" else "cpu"
        self.gpu_masks = args.mask_sampler == "gpu"
        self.data = build_loader(args, None if self.gpu_masks else self.mask_gen, self.dist)
        self.steps_per_epoch = self.data.steps_per_epoch
        wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
        self.lr_schedule = cosine_schedule(args.lr, args.min_lr, args.epochs, self.steps_per_epoch,
                                           args.warmup_epochs, args.warmup_lr, args.warmup_steps)
        self.wd_schedule = cosine_schedule(args.weight_decay, wd_end, args.epochs, self.steps_per_epoch)
        skip = no_decay_names(self.model, args.disable_weight_decay_on_rel_pos_bias)
        self.optimizer = build_adamw(decay_groups(self.model, args.weight_decay, skip), args.lr,
                                     args.opt_betas, args.opt_eps)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.resume()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
        self.model.check_fast_paths(self.device, amp_dtype)  # a clear error now, not from inside compile
        self.train_model = LossModule(self.model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        if args.compile:  # outermost: dynamo sees DDP and splits the graph at its gradient buckets
            # DDP's own forward (its logger, bucket rebuilds) is Python that dynamo steps around rather
            # than traces, which fullgraph=True refuses; the model inside stays one graph (tested).
            self.train_model = CompiledStep(self.train_model, args.compile_mode, say=self.say,
                                            fullgraph=not self.dist.enabled)
        self.log = JsonlLogger(self.out / "metrics.jsonl", enabled=self.dist.is_main)
        if self.dist.is_main:
            preload_plotting()  # not first at an epoch end, where an interrupt may land inside it
        self.log.keep_until(self.global_step)  # on a resume: what a lost stretch logged is logged again

    def say(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def resume(self) -> None:
        path = self.args.resume
        if path is None:
            return
        if path == "auto":
            if not self.ckpt_path.is_file():
                self.say(f"no checkpoint at {self.ckpt_path}; starting from scratch")
                return
            path = str(self.ckpt_path)
        ckpt = load_checkpoint(path)
        check_same_architecture(ckpt.get("config"), self.cfg.to_dict(), path)
        load_model_state(self.model, ckpt["model"], path)
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt.get("epoch", 0))
        self.start_step = int(ckpt.get("step_in_epoch", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        if self.start_step >= self.steps_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        if "rng" in ckpt and not self.dist.enabled:
            set_rng_state(ckpt["rng"])
        note = self.data.check_resume(ckpt.get("data"))
        if note:
            self.say(f"warning: {note}")
        self.say(f"resumed from {path}: epoch {self.start_epoch}, step {self.global_step}")

    def masks_for_step(self, batch_size: int) -> torch.Tensor:
        """Masks drawn here when the loader ships none: on the GPU (one launch) or by the CPU generator."""
        g = self.mask_gen
        if not self.gpu_masks:
            masks = [torch.from_numpy(g()).flatten() for _ in range(batch_size)]
            return torch.stack(masks).bool().to(self.device, non_blocking=True)
        from fastbeit.kernels.block_mask import sample_block_masks

        return sample_block_masks(
            batch_size, g.shape, g.num_masking_patches, g.min_num_patches, g.max_num_patches,
            g.min_aspect, g.max_aspect, mode=g.mode, seed=self.args.seed,
            offset=self.global_step * self.dist.world_size + self.dist.rank, device=self.device,
        )

    def step(self, batch) -> Dict[str, torch.Tensor]:
        args, dev = self.args, self.device
        images = batch[0].to(dev, non_blocking=True)
        token_view = batch[1].to(dev, non_blocking=True)
        mask = batch[2].to(dev, non_blocking=True) if len(batch) > 2 else self.masks_for_step(images.shape[0])
        it = min(self.global_step, len(self.lr_schedule) - 1)
        set_step_values(self.optimizer, float(self.lr_schedule[it]), float(self.wd_schedule[it]))
        token_ids = None
        if self.tokenizer is not None:
            token_ids = self.tokenizer.encode(token_view).flatten(1)  # its own precision, not the step's amp
        with amp_context(args.amp, dev):
            loss, mlm_acc = self.train_model(images, mask, token_ids, self.max_masked)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = args.clip_grad if args.clip_grad and args.clip_grad > 0 else float("inf")  # inf: measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "mlm_acc": mlm_acc.detach(), "grad_norm": grad_norm.detach()}

    def train(self) -> int:
        args = self.args
        total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
        self.say(
            f"pre-training {args.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params) on "
            f"{self.data.num_images} images from {args.data} ({self.data.name} loader): "
            f"{args.epochs} epochs x {self.steps_per_epoch} steps, "
            f"batch {args.batch_size} x {self.dist.world_size} process(es), amp {args.amp}, device {self.device}"
        )
        first_loss = last_loss = None
        epoch, step_in_epoch = self.start_epoch, self.start_step
        bar = tqdm(total=total_steps, initial=min(self.global_step, total_steps), unit="step",
                   disable=args.no_progress or not self.dist.is_main, dynamic_ncols=True)
        try:
            while epoch < args.epochs and self.global_step < total_steps:
                self.data.set_epoch(epoch, step_in_epoch)
                window: List[Dict[str, torch.Tensor]] = []
                window_start, window_images = time.time(), 0
                bar.set_description(f"epoch {epoch}")
                for batch in self.data.loader:
                    with whole_step():
                        stats = self.step(batch)
                        self.global_step += 1
                        step_in_epoch += 1
                    window.append(stats)
                    window_images += batch[0].shape[0] * self.dist.world_size
                    bar.update(1)
                    if self.global_step % args.log_every == 0 or step_in_epoch == self.steps_per_epoch:
                        record = self.log_window(window, window_start, window_images, epoch)
                        first_loss = record["loss"] if first_loss is None else first_loss
                        last_loss = record["loss"]
                        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['mlm_acc']:.3f}",  # nan for pixels
                                        lr=f"{record['lr']:.2e}")
                        window_start, window_images, window = time.time(), 0, []
                    if self.global_step >= total_steps:
                        break
                if step_in_epoch >= self.steps_per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                final = self.global_step >= total_steps or epoch >= args.epochs
                if self.dist.is_main and (epoch % args.save_ckpt_freq == 0 or final):
                    save_checkpoint_or_warn(partial(
                        save_checkpoint, self.ckpt_path, self.model, self.optimizer, self.scaler, args, epoch,
                        step_in_epoch, self.global_step, "epoch", self.data.state()), final)
                    self.plot()
        except KeyboardInterrupt:
            bar.close()
            if self.dist.is_main:
                save_after_interrupt(partial(
                    save_checkpoint, self.ckpt_path, self.model, self.optimizer, self.scaler, args, epoch,
                    step_in_epoch, self.global_step, "interrupted", self.data.state()))
                self.plot()
                return tell_interrupted(self.global_step, self.ckpt_path)
            return 130
        except NonFiniteLoss as exc:
            bar.close()
            return tell_non_finite(exc, self.ckpt_path)
        bar.close()
        self.finish(first_loss, last_loss)
        return 0

    def log_window(self, window, start: float, images: int, epoch: int) -> Dict[str, float]:
        """Reduce the last steps' stats with one host sync; stop on a non-finite loss."""
        stacked = {k: torch.stack([s[k].float() for s in window]).mean() for k in window[0]}
        stacked = {k: all_reduce_mean(v, self.dist) for k, v in stacked.items()}
        values = {k: float(v) for k, v in stacked.items()}
        if not math.isfinite(values["loss"]) and self.scaler is None:
            raise NonFiniteLoss(f"non-finite loss {values['loss']} at step {self.global_step}")
        it = min(self.global_step - 1, len(self.lr_schedule) - 1)
        record = {"step": self.global_step, "epoch": epoch, **values, "lr": float(self.lr_schedule[it]),
                  "wd": float(self.wd_schedule[it]), "img_per_s": images / max(time.time() - start, 1e-9)}
        if self.scaler is not None:
            record["loss_scale"] = float(self.scaler.get_scale())
        self.log.write(record)
        return record

    def plot(self) -> None:
        plot_curves(read_jsonl(self.out / "metrics.jsonl"), self.out / "curves.png",
                    keys=("loss", "mlm_acc", "lr"), title=f"BEiT pre-training ({self.args.model})")

    def finish(self, first_loss, last_loss) -> None:
        if not self.dist.is_main:
            return
        self.plot()
        print(f"done: {self.global_step} steps; checkpoint {self.ckpt_path}, metrics {self.out / 'metrics.jsonl'}, "
              f"plot {self.out / 'curves.png'}")
        if first_loss is not None:
            trend = "fell" if last_loss < first_loss else "did not fall"
            chance = f" (ln(vocab) = {math.log(self.cfg.vocab_size):.3f} is chance)" if self.tokenizer else ""
            print(f"loss {trend} from {first_loss:.3f} to {last_loss:.3f}{chance}")
        if self.args.demo:
            print("This was the built-in sample. On real data:\n"
                  "  python -m fastbeit.pretrain --data /path/to/images --model beit_base --batch-size 128 "
                  "--amp bf16 --output runs/base\n"
                  "  torchrun --nproc-per-node 8 -m fastbeit.pretrain --data /path/to/images ...  (several GPUs)")


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = resolve_args(argv)
    with claim_output(args.output, OUTPUTS, args.resume is not None, args.overwrite):
        trainer = Trainer(args)
        with leaving_group_after(trainer.dist):
            return trainer.train()


if __name__ == "__main__":
    sys.exit(main())
