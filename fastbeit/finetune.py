"""Fine-tune BEiT for image classification (the original recipe, DESIGN.md §3).

    python -m fastbeit.finetune --data DIR --finetune runs/base/checkpoint.pt --model beit_base --amp bf16
    python -m fastbeit.finetune --data /work/shared/data/imagenette --finetune PT.pt --input_size 64 --patch_size 8
    python -m fastbeit.finetune --data DIR --resume runs/finetune/best.pt --eval      # evaluate only

``DIR`` holds ``train/<class>/*`` and ``val/<class>/*`` (or give ``--train`` and ``--val``).
``--finetune`` takes a fastbeit pre-training or fine-tuning checkpoint, or an original unilm,
timm or Hugging Face BEiT state dict (:mod:`fastbeit.interchange`); without it the model starts
from scratch. Mean-pooled patch tokens + LayerNorm + linear head (×0.001 init), per-layer
relative position tables cloned from the shared one, layer-wise lr decay, AdamW with a per-step
cosine schedule after a linear warmup, mixup/cutmix with label smoothing, RandAugment, random
erasing, drop path. Each epoch evaluates top-1/top-5 on val and writes ``last.pt`` (resumable)
and ``best.pt`` atomically, ``metrics.jsonl`` and ``curves.png``; Ctrl-C saves ``last.pt`` first.

Learning rate: the recipe is AdamW 4e-3 at a total batch of 1024 (the original passes ``--lr``
as an absolute value). Without ``--lr`` we scale it linearly: ``4e-3 × batch × update_freq ×
processes / 1024``; an explicit ``--lr`` is used as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastbeit.checkpoint import atomic_save, load_checkpoint, load_model_state, rng_state, set_rng_state
from fastbeit.classifier import (
    REL_POS_MODES,
    BeitForImageClassification,
    layer_decay_groups,
    load_pretrained,
    topk_correct,
)
from fastbeit.cli import (
    NonFiniteLoss,
    add_overwrite_flag,
    add_run_flags,
    amp_context,
    flag_adder,
    resolve_train_val,
    save_after_interrupt,
    save_checkpoint_or_warn,
    start_run,
    tell_interrupted,
    tell_non_finite,
    whole_step,
)
from fastbeit.config import ATTN_BACKENDS, KERNEL_IMPLS, PRESETS, BeitConfig, make_config, preset_of
from fastbeit.data.classification import (
    DEFAULT_AUTO_AUGMENT,
    MixupCutmix,
    build_eval_transform,
    build_train_transform,
    class_folder_datasets,
    soft_target_cross_entropy,
)
from fastbeit.data.folder import ImageLoader
from fastbeit.data.sampler import ResumableSampler
from fastbeit.data.shard import is_shard_source
from fastbeit.data.shard_loader import classification_shard_loaders
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from fastbeit.distributed import DistInfo, all_reduce_mean, leaving_group_after
from fastbeit.errors import UserError, cli_entry
from fastbeit.interchange import LoadedCheckpoint, load_any
from fastbeit.logging_utils import JsonlLogger, plot_curves, preload_plotting, read_jsonl
from fastbeit.optim import build_adamw, cosine_schedule, no_decay_names, set_step_values
from fastbeit.rundir import claim_output
from fastbeit.validate import FlagChecks, check_output_dir, resolve_device

REFERENCE_LR, REFERENCE_BATCH = 4e-3, 1024
OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "curves.png")  # what a run writes in --output
ARCH_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.finetune", description="Fine-tune BEiT for classification.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = flag_adder(p)
    add("--data", "--data_path", default=None, help="folder with train/<class>/ and val/<class>/")
    add("--train", default=None, help="training class folders (overrides DATA/train)")
    add("--val", "--eval_data_path", default=None, help="validation class folders (overrides DATA/val)")
    add("--nb_classes", type=int, default=None, help="default: the number of class folders")
    add("--input_size", type=int, default=None, help="default: the checkpoint's image size, else 224")
    add("--crop_pct", type=float, default=None, help="eval resize = size / crop_pct (default 0.875 below 384 px)")
    add("--imagenet_default_mean_and_std", action="store_true", help="ImageNet mean/std instead of 0.5")
    add("--num_workers", type=int, default=8)

    add("--finetune", default=None, help="pre-trained checkpoint (fastbeit, unilm, timm or Hugging Face)")
    add("--model", default=None, help=f"one of {', '.join(PRESETS)} (default: the checkpoint's size, else beit_base)")
    add("--patch_size", type=int, default=None, help="default: the checkpoint's, else 16")
    add("--num_heads", type=int, default=None,
        help="attention heads of a --finetune checkpoint that records none (no relative position table or config)")
    add("--depth", type=int, default=None, help="override the preset's depth (small experiments)")
    add("--drop_path", type=float, default=0.1)
    add("--layer_scale_init_value", type=float, default=0.1, help="0 disables LayerScale (from scratch only)")
    add("--rel_pos_bias", action="store_true", help="one relative position table per layer (the default)")
    add("--disable_rel_pos_bias", action="store_true", help="no per-layer relative position tables")
    add("--disable_weight_decay_on_rel_pos_bias", action="store_true", help="no weight decay on position tables")
    add("--abs_pos_emb", action="store_true", help="add absolute position embeddings")
    add("--rel_pos_interpolation", choices=REL_POS_MODES, default="geometric",
        help="how a --finetune checkpoint's relative position tables are resized to another patch grid: geometric "
             "is the original BEiT scheme (cubic spline on geometrically spaced offsets); bicubic/bilinear resize "
             "the offset map uniformly (absolute position embeddings are always resized bicubic)")
    add("--use_cls", action="store_true", help="classify the CLS token instead of mean-pooled patches")
    add("--init_scale", type=float, default=0.001, help="head init scale")
    add("--attn", choices=ATTN_BACKENDS, default="auto")
    add("--kernels", choices=KERNEL_IMPLS, default="auto")
    add("--compile", action="store_true", help="torch.compile the model")

    add("--batch_size", type=int, default=64, help="per process")
    add("--update_freq", type=int, default=1, help="gradient accumulation steps")
    add("--epochs", type=int, default=100)
    add("--lr", type=float, default=None, help="default: 4e-3 x total batch / 1024")
    add("--min_lr", type=float, default=1e-6)
    add("--warmup_lr", type=float, default=1e-6,
        help="accepted for the original's command lines and unused there too: warmup starts at 0")
    add("--warmup_epochs", type=float, default=20)
    add("--warmup_steps", type=int, default=-1)
    add("--layer_decay", type=float, default=None, help="default 0.65, 0.75 for 24-layer models")
    add("--weight_decay", type=float, default=0.05)
    add("--weight_decay_end", type=float, default=None)
    add("--opt_eps", type=float, default=1e-8)
    add("--opt_betas", type=float, nargs=2, default=(0.9, 0.999))
    add("--clip_grad", type=float, default=None, help="max grad norm (default: none, as the original)")
    add("--smoothing", type=float, default=0.1, help="label smoothing")
    add("--mixup", type=float, default=0.8)
    add("--cutmix", type=float, default=1.0)
    add("--mixup_prob", type=float, default=1.0)
    add("--mixup_switch_prob", type=float, default=0.5)
    add("--aa", default=DEFAULT_AUTO_AUGMENT, help="RandAugment spec, or 'none'")
    add("--reprob", type=float, default=0.25, help="random erasing probability")
    add("--train_interpolation", default="bicubic")
    add("--amp", choices=("bf16", "fp16", "none"), default="bf16")

    add_run_flags(add, "runs/finetune")
    add("--resume", default=None, help="a fine-tuning checkpoint, or 'auto' for OUTPUT/last.pt")
    add("--eval", action="store_true", help="only evaluate (--resume or a classifier --finetune)")
    add_overwrite_flag(add)
    add("--save_ckpt_freq", type=int, default=1, help="epochs between last.pt saves")
    add("--log_every", type=int, default=20, help="steps between training-loss logs")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_finetune_flags(args)
    resolve_train_val(args)
    for name in ("train", "val"):
        if not Path(getattr(args, name)).is_dir():
            raise UserError(f"{name} folder {getattr(args, name)} does not exist (expected <class>/<image> inside)")
    if args.model is not None:
        args.model = preset_of(args.model)
    return args


def check_finetune_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, the device and the output folder usable (before any work)."""
    checks = FlagChecks(args)
    checks.positive("lr", "batch_size", "epochs", "update_freq", "log_every", "save_ckpt_freq", "patch_size",
                    "depth", "input_size", "nb_classes", "opt_eps")
    checks.non_negative("num_workers", "weight_decay", "weight_decay_end", "clip_grad", "mixup", "cutmix", "min_lr",
                        "warmup_lr", "warmup_epochs", "layer_scale_init_value", "init_scale")
    checks.within("smoothing", 0, 1, high_open=True)
    checks.within("layer_decay", 0, 1, low_open=True)
    checks.within("crop_pct", 0, 1, low_open=True)
    checks.within("opt_betas", 0, 1, high_open=True)
    checks.within("drop_path", 0, 1, high_open=True)
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        checks.within(name, 0, 1)
    checks.choice("train_interpolation", INTERPOLATIONS)
    args.device = resolve_device(args.device)
    check_output_dir(args.output)


def preset_name(cfg: BeitConfig) -> str:
    for name, fields in PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in fields.items() if k != "init_values"):
            return name
    return f"custom (width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads)"


def model_config(args: argparse.Namespace, loaded: Optional[LoadedCheckpoint]) -> BeitConfig:
    """The fine-tuning config: the checkpoint's architecture (checked against ``--model``,
    ``--depth``, ``--patch_size``) with this run's resolution, drop path and position options."""
    layer_scale = args.layer_scale_init_value if args.layer_scale_init_value > 0 else None
    common = dict(img_size=args.input_size, drop_path_rate=args.drop_path, attn_backend=args.attn,
                  kernels=args.kernels, use_rel_pos_bias=not args.disable_rel_pos_bias,
                  use_shared_rel_pos_bias=False, use_abs_pos_emb=args.abs_pos_emb)
    if loaded is None:
        patch_size = 16 if args.patch_size is None else args.patch_size
        cfg = make_config(args.model or "beit_base", patch_size=patch_size, depth=args.depth, **common)
        return cfg.replace(init_values=layer_scale)
    ckpt = loaded.config
    wanted = {"patch_size": args.patch_size, "depth": args.depth}
    if args.model is not None:
        wanted.update({k: v for k, v in PRESETS[args.model].items() if k in ARCH_KEYS})
        wanted["depth"] = args.depth if args.depth is not None else PRESETS[args.model].get("depth")
    diffs = [f"{k} {ckpt[k]} (expected {v})" for k, v in wanted.items() if v is not None and ckpt[k] != v]
    if diffs:
        asked = f"--model {args.model}" if args.model else "the flags"
        raise UserError(f"{loaded.path} is a different model than {asked} asks for: {', '.join(diffs)}")
    cfg = make_config("beit_base", **{k: ckpt[k] for k in ARCH_KEYS}, **common)
    cfg = cfg.replace(init_values=layer_scale if ckpt.get("init_values") else None,
                      use_abs_pos_emb=args.abs_pos_emb or bool(ckpt.get("use_abs_pos_emb")))
    return cfg


def stored_config(stored: Dict[str, Any], args: argparse.Namespace) -> BeitConfig:
    """A config saved by this script, with this run's backend choices."""
    known = set(BeitConfig.__dataclass_fields__)
    return BeitConfig(**{**{k: v for k, v in stored.items() if k in known}, "attn_backend": args.attn,
                         "kernels": args.kernels})


def evaluate(model, loader, device: torch.device, amp: str, dist: DistInfo) -> Dict[str, float]:
    """Mean cross entropy, top-1 and top-5 accuracy (%) over the whole loader (all processes)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with amp_context(amp, device):
                logits = model(images)
            logits = logits.float()
            top1, top5 = topk_correct(logits, targets, (1, 5))
            totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(), top1.double(),
                                   top5.double(), torch.tensor(float(len(targets)), device=device).double()])
    if dist.enabled:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "val_images": int(count)}


class FineTuner:
    """One fine-tuning run: data, model, optimizer and schedules, then ``run()``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dist, self.device = start_run(args)
        self.out = Path(args.output)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        self.resume_ckpt = self.resume_checkpoint()
        heads = args.num_heads or (PRESETS[args.model]["num_heads"] if args.model else None)
        self.loaded = load_any(args.finetune, heads) if args.finetune and self.resume_ckpt is None else None
        if self.loaded is not None:
            self.say(f"loaded {self.loaded.describe()}")
        self.resolve_input_size()
        self.build_data()
        self.build_model()
        self.build_optimizer()
        self.log = JsonlLogger(self.out / "metrics.jsonl", enabled=self.dist.is_main and not args.eval)
        if self.dist.is_main and not args.eval:
            preload_plotting()  # not first at an epoch end, where an interrupt may land inside it
        self.log.keep_until(self.global_step)  # on a resume: what a lost stretch logged is logged again

    def say(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    # ---- set-up
    def build_data(self) -> None:
        args = self.args
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_mean_and_std else (BEIT_MEAN, BEIT_STD)
        train_tf = build_train_transform(args.input_size, args.aa, args.reprob, args.train_interpolation, mean, std)
        val_tf = build_eval_transform(args.input_size, mean, std, args.crop_pct)
        pin = self.device.type == "cuda"
        if is_shard_source(args.train) or is_shard_source(args.val):
            self.train_loader, self.val_loader, self.classes = classification_shard_loaders(
                args.train, args.val, train_tf, val_tf, args.batch_size, nb_classes=args.nb_classes,
                rank=self.dist.rank, world_size=self.dist.world_size, num_workers=args.num_workers, seed=args.seed,
                pin_memory=pin, report=self.dist.is_main)
            self.train_ds, self.val_ds = self.train_loader.shards, self.val_loader.shards
            self.sampler = self.train_loader  # set_epoch(epoch, batch) as the sampler's
        else:
            self.build_folder_data(train_tf, val_tf, pin)
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = self.batches_per_epoch // args.update_freq
        if self.steps_per_epoch == 0 and not args.eval:
            raise UserError(f"{len(self.train_ds)} training images give no full step of {args.batch_size} x "
                            f"{args.update_freq} per process; lower --batch_size or --update_freq")

    def build_folder_data(self, train_tf, val_tf, pin: bool) -> None:
        args = self.args
        self.train_ds, self.val_ds, self.classes = class_folder_datasets(
            args.train, args.val, train_tf, val_tf, args.nb_classes)
        self.sampler = ResumableSampler(len(self.train_ds), args.batch_size, args.seed, self.dist.rank,
                                        self.dist.world_size)
        self.train_loader = ImageLoader(
            self.train_ds, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers,
            pin_memory=pin, drop_last=True)
        val_part = torch.utils.data.Subset(self.val_ds, range(self.dist.rank, len(self.val_ds), self.dist.world_size))
        self.val_loader = ImageLoader(
            val_part, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, pin_memory=pin)

    def resume_checkpoint(self) -> Optional[Dict[str, Any]]:
        path = self.args.resume
        if path == "auto":
            if not self.last_path.is_file():
                self.say(f"no checkpoint at {self.last_path}; starting fresh")
                return None
            path = str(self.last_path)
        if path is None:
            return None
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "classifier":
            raise UserError(f"--resume {path} is not a fine-tuning checkpoint of this script (use --finetune for "
                            "pre-trained weights)")
        ckpt["path"] = path
        return ckpt

    def resolve_input_size(self) -> None:
        """Default: the checkpoint's image size (224 from scratch); a resumed run keeps its own."""
        args = self.args
        if self.resume_ckpt is not None:
            saved = self.resume_ckpt["config"]["img_size"]
            if args.input_size not in (None, saved):
                raise UserError(f"--resume {self.resume_ckpt['path']} was trained at {saved} px, not {args.input_size}")
            args.input_size = saved
        elif args.input_size is None:
            args.input_size = self.loaded.config["img_size"] if self.loaded is not None else 224

    def build_model(self) -> None:
        args, loaded = self.args, self.loaded
        self.load_report = None
        if self.resume_ckpt is not None:
            if self.resume_ckpt.get("classes") and list(self.resume_ckpt["classes"]) != self.classes:
                raise UserError(f"--resume {self.resume_ckpt['path']} was trained on other classes than {args.train}")
            cfg = stored_config(self.resume_ckpt["config"], args)
            nb_classes, pooling = self.resume_ckpt["num_classes"], self.resume_ckpt["use_mean_pooling"]
        else:
            cfg = model_config(args, loaded)
            nb_classes, pooling = args.nb_classes or len(self.classes), not args.use_cls
            if args.eval:
                if loaded is None or loaded.kind != "classifier":
                    what = "no checkpoint" if loaded is None else f"a {loaded.kind} checkpoint"
                    raise UserError(f"--eval needs a fine-tuned classifier (--resume or --finetune); got {what}")
                nb_classes, pooling = loaded.num_classes, bool(loaded.use_mean_pooling)
        if nb_classes < len(self.classes):
            raise UserError(f"the model has {nb_classes} classes but the data has {len(self.classes)} class folders "
                            f"(labels up to {len(self.classes) - 1})")
        self.cfg = cfg
        self.model = BeitForImageClassification(cfg, nb_classes, use_mean_pooling=pooling, init_scale=args.init_scale)
        if self.resume_ckpt is not None:
            load_model_state(self.model, self.resume_ckpt["model"], self.resume_ckpt["path"])
        elif loaded is not None:
            self.load_report = load_pretrained(self.model, loaded.state_dict, args.rel_pos_interpolation)
            self.say(f"pre-trained weights: {self.load_report.summary()}")
        self.model.to(self.device)
        self.train_model = torch.compile(self.model) if args.compile else self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

    def build_optimizer(self) -> None:
        args = self.args
        total_batch = args.batch_size * args.update_freq * self.dist.world_size
        self.lr = args.lr if args.lr is not None else REFERENCE_LR * total_batch / REFERENCE_BATCH
        if args.layer_decay is None:  # the recipe: 0.65 for Base, 0.75 for Large (24 layers)
            args.layer_decay = 0.75 if self.cfg.depth >= 24 else 0.65
        skip = no_decay_names(self.model, args.disable_weight_decay_on_rel_pos_bias)
        groups = layer_decay_groups(self.model, args.weight_decay, args.layer_decay, skip)
        self.optimizer = build_adamw(groups, self.lr, args.opt_betas, args.opt_eps)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None
        steps = max(self.steps_per_epoch, 1)
        # From 0, not --warmup_lr: the original parses that flag but never passes it on.
        self.lr_schedule = cosine_schedule(self.lr, args.min_lr, args.epochs, steps, args.warmup_epochs,
                                           0.0, args.warmup_steps)
        wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
        self.wd_schedule = cosine_schedule(args.weight_decay, wd_end, args.epochs, steps)
        self.mixup = MixupCutmix(self.model.num_classes, args.mixup, args.cutmix, args.mixup_prob,
                                 args.mixup_switch_prob, args.smoothing, rng=random.Random(args.seed + self.dist.rank))
        self.epoch, self.step_in_epoch, self.global_step, self.best_acc1 = 0, 0, 0, -1.0
        if self.resume_ckpt is not None:
            self.restore(self.resume_ckpt)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt.get("epoch", 0)), int(ckpt.get("step_in_epoch", 0))
        self.global_step, self.best_acc1 = int(ckpt.get("global_step", 0)), float(ckpt.get("best_acc1", -1.0))
        if self.step_in_epoch >= self.steps_per_epoch * self.args.update_freq:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if "rng" in ckpt and not self.dist.enabled:
            set_rng_state(ckpt["rng"])
        self.say(f"resumed from {ckpt['path']}: epoch {self.epoch}, step {self.global_step}")

    # ---- checkpoints and logs
    def save(self, path: Path, reason: str, full: bool = True, metrics: Optional[Dict[str, float]] = None) -> None:
        if not self.dist.is_main:
            return
        obj = {"model": self.model.state_dict(), "config": self.cfg.to_dict(), "kind": "classifier",
               "num_classes": self.model.num_classes, "use_mean_pooling": self.model.use_mean_pooling,
               "classes": self.classes, "epoch": self.epoch,
               "step_in_epoch": (self.global_step - self.epoch * self.steps_per_epoch) * self.args.update_freq,
               "global_step": self.global_step, "best_acc1": self.best_acc1, "reason": reason,
               "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()}}
        if metrics:
            obj.update(metrics)
        if full:
            obj.update(optimizer=self.optimizer.state_dict(), rng=rng_state(),
                       scaler=self.scaler.state_dict() if self.scaler is not None else None)
        atomic_save(obj, path)

    def plot(self) -> None:
        if self.dist.is_main:
            plot_curves(read_jsonl(self.out / "metrics.jsonl"), self.out / "curves.png", keys=("loss", "acc1", "lr"),
                        title=f"BEiT fine-tuning ({preset_name(self.cfg)})")

    # ---- training
    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixup.active:
            images, soft = self.mixup(images, targets)
            with amp_context(self.args.amp, self.device):
                logits = self.train_model(images)
            return soft_target_cross_entropy(logits, soft)
        with amp_context(self.args.amp, self.device):
            logits = self.train_model(images)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.args.smoothing)

    def optimizer_step(self) -> torch.Tensor:
        clip = self.args.clip_grad
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def train_epoch(self, bar: tqdm) -> Dict[str, float]:
        args, freq = self.args, self.args.update_freq
        self.train_model.train()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        window: List[torch.Tensor] = []
        epoch_losses: List[torch.Tensor] = []
        start, images_seen, norm = time.time(), 0, torch.zeros(())
        for images, targets in self.train_loader:
            if self.step_in_epoch >= self.steps_per_epoch * freq:
                break  # leftover micro-batches that make no full step
            it = min(self.global_step, len(self.lr_schedule) - 1)
            if self.step_in_epoch % freq == 0:
                set_step_values(self.optimizer, float(self.lr_schedule[it]), float(self.wd_schedule[it]))
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with whole_step():
                loss = self.loss(images, targets)
                scaled = loss / freq
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                self.step_in_epoch += 1
                images_seen += images.shape[0] * self.dist.world_size
                window.append(loss.detach())
                if self.step_in_epoch % freq:
                    continue
                norm = self.optimizer_step()
                self.global_step += 1
            bar.update(1)
            if self.global_step % args.log_every == 0 or self.step_in_epoch == self.steps_per_epoch * freq:
                mean_loss = float(all_reduce_mean(torch.stack(window).float().mean(), self.dist))
                if not math.isfinite(mean_loss) and self.scaler is None:
                    raise NonFiniteLoss(f"non-finite loss {mean_loss} at step {self.global_step}")
                epoch_losses.append(torch.tensor(mean_loss))
                record = {"step": self.global_step, "epoch": self.epoch + 1, "loss": mean_loss,
                          "lr": float(self.lr_schedule[it]), "grad_norm": float(norm),
                          "img_per_s": images_seen / max(time.time() - start, 1e-9)}
                self.log.write(record)
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{record['lr']:.2e}")
                window, start, images_seen = [], time.time(), 0
        return {"train_loss": float(torch.stack(epoch_losses).mean()) if epoch_losses else float("nan")}

    def run(self) -> int:
        args = self.args
        if args.eval:
            stats = evaluate(self.model, self.val_loader, self.device, args.amp, self.dist)
            self.say(f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  loss {stats['val_loss']:.4f} "
                     f"on {stats['val_images']} images of {args.val}")
            return 0
        total = args.epochs * self.steps_per_epoch
        self.say(f"fine-tuning {preset_name(self.cfg)} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M "
                 f"params) on {len(self.train_ds)} images, {len(self.classes)} classes; val {len(self.val_ds)}: "
                 f"{args.epochs} epochs x {self.steps_per_epoch} steps, lr {self.lr:.3g}, layer decay "
                 f"{args.layer_decay}, amp {args.amp}, device {self.device}")
        bar = tqdm(total=total, initial=min(self.global_step, total), unit="step", dynamic_ncols=True,
                   disable=args.no_progress or not self.dist.is_main)
        try:
            while self.epoch < args.epochs:
                bar.set_description(f"epoch {self.epoch}")
                train_stats = self.train_epoch(bar)
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.end_epoch(train_stats)
        except KeyboardInterrupt:
            bar.close()
            save_after_interrupt(lambda: self.save(self.last_path, "interrupted"))
            self.plot()
            return tell_interrupted(self.global_step, self.last_path) if self.dist.is_main else 130
        except NonFiniteLoss as exc:
            bar.close()
            return tell_non_finite(exc, self.last_path)
        bar.close()
        self.say(f"done: best top-1 {self.best_acc1:.2f}%; checkpoints {self.best_path} and {self.last_path}, "
                 f"metrics {self.out / 'metrics.jsonl'}, plot {self.out / 'curves.png'}")
        return 0

    def end_epoch(self, train_stats: Dict[str, float]) -> None:
        stats = evaluate(self.model, self.val_loader, self.device, self.args.amp, self.dist)
        improved = stats["acc1"] > self.best_acc1
        final = self.epoch >= self.args.epochs
        if improved:
            self.best_acc1 = stats["acc1"]
            save_checkpoint_or_warn(lambda: self.save(self.best_path, "best", full=False, metrics={
                "acc1": stats["acc1"], "acc5": stats["acc5"]}), final)
        self.log.write({"step": self.global_step, "epoch": self.epoch, **train_stats, **stats,
                        "best_acc1": self.best_acc1})
        if self.epoch % self.args.save_ckpt_freq == 0 or final:
            save_checkpoint_or_warn(lambda: self.save(self.last_path, "epoch"), final)
        self.plot()
        self.say(f"epoch {self.epoch}: train loss {train_stats['train_loss']:.4f}, val top-1 {stats['acc1']:.2f}% "
                 f"top-5 {stats['acc5']:.2f}% (best {self.best_acc1:.2f}%)")


def build_trainer(argv: Optional[List[str]] = None) -> Tuple[FineTuner, argparse.Namespace]:
    args = resolve_args(argv)
    return FineTuner(args), args


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = resolve_args(argv)
    claim = contextlib.nullcontext() if args.eval else claim_output(
        args.output, OUTPUTS, args.resume is not None, args.overwrite)
    with claim:
        trainer = FineTuner(args)
        with leaving_group_after(trainer.dist):
            return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
