"""Semantic segmentation fine-tuning: BEiT backbone + UperNet head (the BEiT paper's ADE20K recipe).

    python -m fastbeit.segment --data ../shared/data/camvid --finetune runs/base/checkpoint.pt --output runs/seg
    python -m fastbeit.segment --data DIR --model beit_base --output runs/seg_scratch      # no pre-training
    python -m fastbeit.segment --data DIR --resume auto --output runs/seg                  # continue a run
    python -m fastbeit.segment --data DIR --eval_only --resume runs/seg/best.pt --val_split test

Data: ``DIR/{train,val,test}/{images/*.jpg,labels/*.png}`` (CamVid layout; 8-bit class maps).
Training: random rescale / crop / flip / photometric distortion, AdamW with layer-wise lr decay,
poly (or cosine) schedule with linear warmup, cross entropy (+0.4 × auxiliary FCN head) with an
ignore index, bf16 autocast. Evaluation: sliding windows of the crop size (stride 2/3 of it),
mIoU / per-class IoU / pixel accuracy. Writes ``last.pt`` and ``best.pt`` (atomic),
``metrics.jsonl``, ``curves.png``; Ctrl-C saves ``last.pt`` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastbeit.checkpoint import atomic_save, load_checkpoint, load_model_state, rng_state, set_rng_state
from fastbeit.classifier import REL_POS_MODES
from fastbeit.cli import (
    NonFiniteLoss,
    add_overwrite_flag,
    add_run_flags,
    amp_context,
    flag_adder,
    save_after_interrupt,
    save_checkpoint_or_warn,
    tell_interrupted,
    tell_non_finite,
    whole_step,
)
from fastbeit.config import ATTN_BACKENDS, PRESETS, BeitConfig, make_config
from fastbeit.data.folder import drop_skipped
from fastbeit.data.sampler import ResumableSampler
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, IMAGENET_MEAN, IMAGENET_STD
from fastbeit.data.workers import data_loader
from fastbeit.errors import UserError, cli_entry
from fastbeit.logging_utils import JsonlLogger, plot_curves, preload_plotting, read_jsonl
from fastbeit.optim import build_adamw
from fastbeit.rundir import claim_output
from fastbeit.segmentation.backbone import segmentation_config
from fastbeit.segmentation.data import check_classes, open_split, read_class_names
from fastbeit.segmentation.head import resize_to
from fastbeit.segmentation.inference import default_stride, predict
from fastbeit.segmentation.metrics import confusion_matrix, format_table, segmentation_metrics
from fastbeit.segmentation.model import BeitSegmenter, HeadConfig, describe
from fastbeit.segmentation.optim import SCHEDULES, apply_lr, layer_decay_groups, learning_rate
from fastbeit.segmentation.pretrained import load_pretrained_backbone
from fastbeit.segmentation.transforms import EvalTransform, TrainTransform
from fastbeit.validate import FlagChecks, check_output_dir, resolve_device

KIND = "segmentation"
OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "curves.png")  # what a training run writes in --output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastbeit.segment",
        description="Semantic segmentation with a BEiT backbone and a UperNet head (CamVid-layout data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    add = flag_adder(p)

    add("--data", default=None, help="dataset root: DATA/{train,val,test}/{images,labels}")
    add("--train_split", default="train")
    add("--val_split", default="val")
    add("--num_classes", type=int, default=11)
    add("--ignore_index", type=int, default=11, help="label value that is not scored (CamVid: 11 = unlabelled)")
    add("--crop_size", type=int, default=352, help="training crop, also the inference window (square)")
    add("--img_scale", type=int, nargs=2, default=(480, 360), metavar=("LONG", "SHORT"),
        help="images are rescaled to fit this (aspect kept); training multiplies it by a random ratio")
    add("--ratio_range", type=float, nargs=2, default=(0.5, 2.0))
    add("--cat_max_ratio", type=float, default=0.75, help="re-draw crops that one class fills this much (1 = off)")
    add("--photometric", action=argparse.BooleanOptionalAction, default=True, help="photometric distortion")
    add("--imagenet_default_mean_and_std", action="store_true", default=None,
        help="ImageNet mean/std instead of 0.5 (default: as the --finetune checkpoint was pre-trained)")
    add("--max_train_images", type=int, default=None, help="use only the first N training images")
    add("--max_val_images", type=int, default=None, help="evaluate only the first N images")

    add("--finetune", default=None, help="a fastbeit pre-training (or classification) checkpoint for the backbone")
    add("--rel_pos_interpolation", choices=REL_POS_MODES, default="geometric",
        help="how the --finetune checkpoint's relative position tables are resized to the crop's patch grid: "
             "geometric is the original BEiT scheme; bicubic/bilinear resize the offset map uniformly")
    add("--model", default="beit_base", help=f"preset when training from scratch: {', '.join(PRESETS)}")
    add("--patch_size", type=int, default=16, help="from scratch only")
    add("--embed_dim", type=int, default=None, help="from scratch only: override the preset's width")
    add("--depth", type=int, default=None, help="from scratch only: override the preset's depth")
    add("--num_heads", type=int, default=None, help="from scratch only: override the preset's heads")
    add("--layer_scale_init_value", type=float, default=0.1, help="from scratch only; 0 disables LayerScale")
    add("--drop_path", type=float, default=0.1)
    add("--out_indices", type=int, nargs=4, default=None, help="blocks read by the pyramid (default 3 5 7 11, "
        "scaled to the depth)")
    add("--head_channels", type=int, default=None, help="UperNet width (default: the backbone width)")
    add("--aux_weight", type=float, default=0.4, help="weight of the auxiliary FCN head's loss (0 = off)")
    add("--attn", choices=ATTN_BACKENDS, default="auto", help="attention backend")

    add("--batch_size", type=int, default=16)
    add("--epochs", type=int, default=200)
    add("--max_steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    add("--lr", type=float, default=1e-3)
    add("--layer_decay", type=float, default=0.65)
    add("--weight_decay", type=float, default=0.05)
    add("--opt_betas", type=float, nargs=2, default=(0.9, 0.999))
    add("--opt_eps", type=float, default=1e-8)
    add("--schedule", choices=SCHEDULES, default="poly")
    add("--power", type=float, default=1.0, help="poly exponent")
    add("--min_lr", type=float, default=0.0)
    add("--warmup_iters", type=int, default=1500)
    add("--warmup_ratio", type=float, default=1e-6, help="warmup starts at lr × this")
    add("--clip_grad", type=float, default=0.0, help="max grad norm (0 = off, as the original)")
    add("--amp", choices=("bf16", "none"), default="bf16")

    add("--eval_every", type=int, default=10, help="epochs between evaluations (the last epoch always)")
    add("--eval_stride", type=int, default=None, help="sliding-window stride (default 2/3 of the crop)")
    add("--eval_only", action="store_true", help="evaluate the --resume checkpoint on --val_split and stop")
    add_run_flags(add, "runs/segment")
    add("--resume", default=None, help="a segmentation checkpoint, or 'auto' for OUTPUT/last.pt")
    add_overwrite_flag(add)
    add("--log_every", type=int, default=10, help="steps between training-loss logs")
    add("--num_workers", type=int, default=4)
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.data is None:
        raise UserError("--data is required: a folder with {train,val,test}/{images,labels} (CamVid layout)")
    check_classes(args.num_classes, args.ignore_index)
    checks = FlagChecks(args)
    checks.positive("crop_size", "batch_size", "epochs", "eval_every", "log_every", "lr", "patch_size", "depth",
                    "embed_dim", "num_heads", "head_channels", "max_steps", "max_train_images", "max_val_images",
                    "opt_eps", "power")
    checks.non_negative("num_workers", "weight_decay", "clip_grad", "min_lr", "warmup_iters", "aux_weight",
                        "layer_scale_init_value")
    checks.within("layer_decay", 0, 1, low_open=True)
    checks.within("opt_betas", 0, 1, high_open=True)
    checks.within("drop_path", 0, 1, high_open=True)
    checks.within("warmup_ratio", 0, 1)
    checks.within("cat_max_ratio", 0, 1, low_open=True)
    if args.batch_size < 2:
        raise UserError("--batch_size must be at least 2 (BatchNorm in the head needs more than one sample)")
    if min(args.img_scale) <= 0 or not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise UserError("--img_scale must be positive and --ratio_range must satisfy 0 < low <= high")
    if args.eval_stride is not None and not 0 < args.eval_stride <= args.crop_size:
        raise UserError(f"--eval_stride must be in [1, crop size {args.crop_size}]")
    if args.eval_only and args.resume is None:
        raise UserError("--eval_only needs the model to evaluate: --resume PATH (a segmentation checkpoint)")
    args.device = resolve_device(args.device)
    check_output_dir(args.output)
    return args


# --- model -----------------------------------------------------------------------------------


def config_from_dict(data: Dict[str, Any], path: str) -> BeitConfig:
    fields = {f.name for f in dataclasses.fields(BeitConfig)}
    try:
        return BeitConfig(**{k: v for k, v in data.items() if k in fields})
    except (TypeError, UserError) as exc:
        raise UserError(f"checkpoint {path} has an unusable model config: {exc}") from None


def read_finetune_checkpoint(path: str) -> Tuple[BeitConfig, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(config, backbone weights, the run's args) of a pre-training or classification checkpoint."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == KIND:
        raise UserError(f"{path} is a segmentation checkpoint; continue it with --resume, not --finetune")
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} has no model config: not a fastbeit pre-training checkpoint")
    return config_from_dict(ckpt["config"], path), ckpt["model"], ckpt.get("args") or {}


def build_model(args: argparse.Namespace, saved: Optional[Dict[str, Any]] = None) -> Tuple[BeitSegmenter, Dict]:
    """The segmenter from a resumed checkpoint, a pre-training checkpoint or a preset (in that order),
    and the pre-training run's args (for its normalization)."""
    if saved is not None:
        cfg = config_from_dict(saved["config"], args.resume).replace(attn_backend=args.attn)
        return BeitSegmenter(cfg, HeadConfig.from_dict(saved["head"])), {}
    head = HeadConfig(num_classes=args.num_classes, channels=args.head_channels,
                      out_indices=tuple(args.out_indices) if args.out_indices else None)
    if args.finetune:
        base, state, pre_args = read_finetune_checkpoint(args.finetune)
    else:
        base = make_config(args.model, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                           num_heads=args.num_heads, init_values=args.layer_scale_init_value)
        state, pre_args = None, {}
    if args.crop_size % base.patch_size:
        raise UserError(f"--crop_size {args.crop_size} is not a multiple of the patch size {base.patch_size}")
    cfg = segmentation_config(base, args.crop_size, args.drop_path).replace(attn_backend=args.attn, kernels="auto")
    model = BeitSegmenter(cfg, head)
    if state is not None:
        notes = load_pretrained_backbone(model.backbone, state, args.finetune, args.rel_pos_interpolation)
        tqdm.write(f"backbone from {args.finetune}: {notes}")
    return model, pre_args


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross entropy of logits resized to the labels, averaged over the labelled pixels (0 if none)."""
    logits = resize_to(logits.float(), labels.shape[-2:])
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def normalization(args: argparse.Namespace, pre_args: Dict[str, Any]) -> Tuple[Tuple, Tuple]:
    imagenet = args.imagenet_default_mean_and_std
    if imagenet is None:
        imagenet = bool(pre_args.get("imagenet_default_mean_and_std", False))
    return (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (BEIT_MEAN, BEIT_STD)


class Trainer:
    """The run's state; ``train()`` runs epochs, evaluates, checkpoints and handles Ctrl-C."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.out = Path(args.output)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        saved = self.read_resume()
        self.model, pre_args = build_model(args, saved)
        self.model.to(self.device)
        self.cfg = self.model.cfg
        if saved is not None:
            load_model_state(self.model, saved["model"], args.resume)
            self.mean, self.std = tuple(saved["mean"]), tuple(saved["std"])
        else:
            self.mean, self.std = normalization(args, pre_args)
        self.crop = self.cfg.img_size
        self.class_names = read_class_names(args.data, self.model.num_classes)
        self.val_set, _ = open_split(args.data, args.val_split, EvalTransform(args.img_scale, self.mean, self.std),
                                     self.model.num_classes, args.ignore_index, args.max_val_images,
                                     on_bad="drop")  # an unreadable val image is left out, never replaced
        self.start_epoch, self.start_step, self.global_step, self.best_miou = 0, 0, 0, -1.0
        if args.eval_only:
            self.start_epoch = int(saved.get("epoch", 0)) if saved else 0
            return
        train_tf = TrainTransform(self.crop, args.img_scale, args.ratio_range, args.cat_max_ratio,
                                  args.photometric, args.ignore_index, self.mean, self.std)
        self.train_set, self.class_pixels = open_split(args.data, args.train_split, train_tf, self.model.num_classes,
                                                       args.ignore_index, args.max_train_images, args.seed)
        self.sampler = ResumableSampler(len(self.train_set), args.batch_size, args.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.train_set)} training images give no full batch of {args.batch_size}; "
                            "lower --batch_size")
        self.loader = data_loader(
            self.train_set, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers,
            drop_last=True, pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = min(args.warmup_iters, self.total_steps)
        groups = layer_decay_groups(self.model, args.weight_decay, args.layer_decay)
        self.optimizer = build_adamw(groups, args.lr, args.opt_betas, args.opt_eps)
        for group, source in zip(self.optimizer.param_groups, groups):
            group["lr_scale"] = source["lr_scale"]
        if saved is not None:
            self.restore(saved)
        self.log = JsonlLogger(self.out / "metrics.jsonl")
        preload_plotting()  # not first at an evaluation, where an interrupt may land inside it
        self.log.keep_until(self.global_step)  # on a resume: what a lost stretch logged is logged again

    def read_resume(self) -> Optional[Dict[str, Any]]:
        path = self.args.resume
        if path is None:
            return None
        if path == "auto":
            if not self.last_path.is_file():
                tqdm.write(f"no checkpoint at {self.last_path}; starting a new run")
                self.args.resume = None
                return None
            path = self.args.resume = str(self.last_path)
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != KIND:
            raise UserError(f"{path} is not a segmentation checkpoint (a pre-training one goes to --finetune)")
        return ckpt

    def restore(self, saved: Dict[str, Any]) -> None:
        if "optimizer" in saved:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.start_epoch = int(saved.get("epoch", 0))
        self.start_step = int(saved.get("step_in_epoch", 0))
        self.global_step = int(saved.get("global_step", 0))
        self.best_miou = float(saved.get("best_miou", -1.0))
        if self.start_step >= self.steps_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        if "rng" in saved:
            set_rng_state(saved["rng"])
        tqdm.write(f"resumed from {self.args.resume}: epoch {self.start_epoch}, step {self.global_step}")

    def autocast(self):
        return amp_context(self.args.amp, self.device)

    # --- one step / one evaluation -----------------------------------------------------------

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        args = self.args
        lr = learning_rate(self.global_step, self.total_steps, args.lr, args.schedule, args.min_lr, args.power,
                           self.warmup_steps, args.warmup_ratio)
        apply_lr(self.optimizer, lr)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast():
            main, aux = self.model.forward_train(images)
        loss_main = seg_loss(main, labels, args.ignore_index)
        loss = loss_main
        stats = {"loss_main": loss_main.detach()}
        if args.aux_weight > 0:
            loss_aux = seg_loss(aux, labels, args.ignore_index)
            loss = loss + args.aux_weight * loss_aux
            stats["loss_aux"] = loss_aux.detach()
        loss.backward()
        max_norm = args.clip_grad if args.clip_grad > 0 else float("inf")
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats["loss"] = loss.detach()
        return stats

    @torch.no_grad()
    def evaluate(self, show: bool = True) -> Dict[str, Any]:
        """Sliding-window predictions on the validation split → mIoU and friends."""
        was_training = self.model.training
        self.model.eval()
        loader = data_loader(self.val_set, batch_size=1, num_workers=self.args.num_workers, collate_fn=drop_skipped,
                             generator=torch.Generator())  # leaves the global RNG alone
        conf = torch.zeros(self.model.num_classes, self.model.num_classes, dtype=torch.int64)
        left_out = 0
        for batch in tqdm(loader, desc="eval", leave=False, disable=not show or self.args.no_progress):
            if batch is None:  # unreadable: left out (named once by the dataset)
                left_out += 1
                continue
            image, label = batch
            image = image.to(self.device)
            with self.autocast():
                pred = predict(self.model, image, self.model.num_classes, self.crop, label.shape[-2:],
                               self.args.eval_stride or default_stride(self.crop))
            conf += confusion_matrix(pred.cpu(), label, self.model.num_classes, self.args.ignore_index)
        self.model.train(was_training)
        if left_out:
            tqdm.write(f"evaluation left out {left_out} unreadable image(s) of the {len(self.val_set)} in "
                       f"{self.args.val_split}")
        return segmentation_metrics(conf)

    # --- checkpoints and logs ----------------------------------------------------------------

    def save(self, path: Path, epoch: int, step_in_epoch: int, reason: str,
             metrics: Optional[Dict[str, Any]] = None) -> None:
        atomic_save({
            "kind": KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "head": self.model.head_cfg.to_dict(),
            "class_names": self.class_names,
            "ignore_index": self.args.ignore_index,
            "mean": list(self.mean), "std": list(self.std),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
            "best_miou": self.best_miou, "metrics": metrics,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
            "rng": rng_state(), "reason": reason,
        }, path)

    def eval_record(self, metrics: Dict[str, Any], epoch: int) -> Dict[str, Any]:
        def clean(x: float) -> Optional[float]:
            return None if math.isnan(x) else x

        record = {"step": self.global_step, "epoch": epoch, "split": self.args.val_split}
        record.update({k: clean(metrics[k]) for k in ("mIoU", "mAcc", "aAcc")})
        record["IoU"] = {n: clean(v) for n, v in zip(self.class_names, metrics["IoU"])}
        return record

    def plot(self) -> None:
        plot_curves(read_jsonl(self.out / "metrics.jsonl"), self.out / "curves.png",
                    keys=("loss", "mIoU", "lr"), title="BEiT + UperNet segmentation")

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> int:
        args = self.args
        total = self.total_steps if args.max_steps is None else min(self.total_steps, args.max_steps)
        tqdm.write(f"{describe(self.model)}\ntraining on {len(self.train_set)} images of {args.data}/"
                   f"{args.train_split} ({self.steps_per_epoch} steps an epoch x {args.epochs} epochs, batch "
                   f"{args.batch_size}, crop {self.crop}, amp {args.amp}, device {self.device}), evaluating on "
                   f"{len(self.val_set)} images of {args.val_split}")
        epoch, step_in_epoch = self.start_epoch, self.start_step
        bar = tqdm(total=total, initial=min(self.global_step, total), unit="step", dynamic_ncols=True,
                   disable=args.no_progress)
        self.model.train()
        try:
            while epoch < args.epochs and self.global_step < total:
                self.sampler.set_epoch(epoch, step_in_epoch)
                self.train_set.set_epoch(epoch)
                bar.set_description(f"epoch {epoch}")
                window, start, seen = [], time.time(), 0
                for images, labels in self.loader:
                    with whole_step():
                        window.append(self.step(images, labels))
                        self.global_step += 1
                        step_in_epoch += 1
                    seen += images.shape[0]
                    bar.update(1)
                    if self.global_step % args.log_every == 0 or step_in_epoch == self.steps_per_epoch:
                        record = self.log_window(window, start, seen, epoch)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                        window, start, seen = [], time.time(), 0
                    if self.global_step >= total:
                        break
                if step_in_epoch >= self.steps_per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                finished = epoch >= args.epochs or self.global_step >= total
                metrics = None
                if finished or (step_in_epoch == 0 and epoch % args.eval_every == 0):
                    metrics = self.evaluate()
                    self.log.write(self.eval_record(metrics, epoch))
                    tqdm.write(f"epoch {epoch}: mIoU {100 * metrics['mIoU']:.2f}  aAcc {100 * metrics['aAcc']:.2f}"
                               f"  (best {100 * max(self.best_miou, metrics['mIoU']):.2f})")
                    if metrics["mIoU"] > self.best_miou:
                        self.best_miou = metrics["mIoU"]
                        save_checkpoint_or_warn(
                            partial(self.save, self.best_path, epoch, step_in_epoch, "best", metrics), finished)
                save_checkpoint_or_warn(
                    partial(self.save, self.last_path, epoch, step_in_epoch, "epoch", metrics), finished)
                self.plot()
        except KeyboardInterrupt:
            bar.close()
            save_after_interrupt(lambda: self.save(self.last_path, epoch, step_in_epoch, "interrupted"))
            self.plot()
            return tell_interrupted(self.global_step, self.last_path)
        except NonFiniteLoss as exc:
            bar.close()
            return tell_non_finite(exc, self.last_path)
        bar.close()
        self.finish()
        return 0

    def log_window(self, window: List[Dict[str, torch.Tensor]], start: float, seen: int, epoch: int) -> Dict:
        values = {k: float(torch.stack([s[k].float() for s in window]).mean()) for k in window[0]}
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(f"non-finite loss {values['loss']} at step {self.global_step}")
        lr = learning_rate(self.global_step - 1, self.total_steps, self.args.lr, self.args.schedule,
                           self.args.min_lr, self.args.power, self.warmup_steps, self.args.warmup_ratio)
        record = {"step": self.global_step, "epoch": epoch, **values, "lr": lr,
                  "img_per_s": seen / max(time.time() - start, 1e-9)}
        self.log.write(record)
        return record

    def finish(self) -> None:
        best = load_checkpoint(self.best_path) if self.best_path.is_file() else None
        if best is not None and best.get("metrics"):
            print(f"best (epoch {best['epoch']}, {self.args.val_split}):\n"
                  f"{format_table(best['metrics'], self.class_names)}")
        print(f"done: {self.global_step} steps; checkpoints {self.last_path} and {self.best_path}, metrics "
              f"{self.out / 'metrics.jsonl'}, plot {self.out / 'curves.png'}")

    def evaluate_only(self) -> int:
        metrics = self.evaluate()
        print(f"{self.args.resume} on {len(self.val_set)} images of {self.args.val_split}:\n"
              f"{format_table(metrics, self.class_names)}")
        path = self.out / f"eval_{self.args.val_split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.eval_record(metrics, int(self.start_epoch)), indent=2) + "\n")
        print(f"wrote {path}")
        return 0


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = resolve_args(argv)
    if args.eval_only:
        return Trainer(args).evaluate_only()
    with claim_output(args.output, OUTPUTS, args.resume is not None, args.overwrite):
        return Trainer(args).train()


if __name__ == "__main__":
    sys.exit(main())
