"""Linear probe: a linear classifier on frozen BEiT features of one block.

    python -m fastbeit.linprobe --checkpoint runs/base/checkpoint.pt --data DIR --block 9 --output runs/probe

The features are the average of the patch tokens after block ``--block`` (1-based; default
``3/4`` of the depth, block 9 for Base as in the paper), from the eval transform (resize +
centre crop). They are extracted once and cached in ``--cache`` under a key made of the
checkpoint (path, size, time), the block, the image settings and the file lists, so a second
run with other classifier settings skips the encoder.

The classifier is ``BatchNorm1d(affine=False)`` then ``Linear``, the usual linear-probe head
(MAE, BEiT v2): the normalization is a fixed per-feature affine map at test time, so the probe
stays linear, and it makes one learning rate fit features of any scale. Trained with SGD
(momentum 0.9, lr 0.1) or AdamW (lr 1e-3), cosine schedule. Deviation: the cached features are
not augmented (the original probes see a random crop and flip each epoch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastbeit.checkpoint import atomic_save
from fastbeit.classifier import BeitForImageClassification, load_pretrained, topk_correct
from fastbeit.cli import add_run_flags, amp_context, flag_adder, resolve_train_val
from fastbeit.config import ATTN_BACKENDS, KERNEL_IMPLS, BeitConfig
from fastbeit.data.classification import build_eval_transform, class_folder_datasets
from fastbeit.data.folder import ImageLoader
from fastbeit.data.shard import is_shard_source
from fastbeit.data.shard_loader import ShardLoader, classification_shard_loaders
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, IMAGENET_MEAN, IMAGENET_STD
from fastbeit.errors import UserError, cli_entry
from fastbeit.interchange import LoadedCheckpoint, load_any
from fastbeit.logging_utils import JsonlLogger, plot_curves, read_jsonl
from fastbeit.optim import cosine_schedule
from fastbeit.rundir import claim_output
from fastbeit.validate import FlagChecks, check_output_dir, resolve_device

CACHE_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.linprobe", description="Linear probe on frozen BEiT features.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = flag_adder(p)
    add("--checkpoint", "--finetune", required=True, help="fastbeit, unilm, timm or Hugging Face BEiT weights")
    add("--num_heads", type=int, default=None,
        help="attention heads of a checkpoint that records none (no relative position table or config)")
    add("--data", "--data_path", default=None, help="folder with train/<class>/ and val/<class>/")
    add("--train", default=None)
    add("--val", default=None)
    add("--block", type=int, default=None, help="1-based block whose tokens are pooled (default: 3/4 of the depth)")
    add("--input_size", type=int, default=None, help="default: the checkpoint's image size")
    add("--imagenet_default_mean_and_std", action="store_true")
    add("--cache", default=None, help="feature cache folder (default: OUTPUT/cache)")
    add("--extract_batch_size", type=int, default=64)
    add("--num_workers", type=int, default=4)
    add("--amp", choices=("bf16", "fp16", "none"), default="bf16", help="autocast for the extraction")
    add("--attn", choices=ATTN_BACKENDS, default="auto")
    add("--kernels", choices=KERNEL_IMPLS, default="auto")
    add("--opt", choices=("sgd", "adamw"), default="sgd")
    add("--lr", type=float, default=None, help="default 0.1 (sgd) or 1e-3 (adamw)")
    add("--weight_decay", type=float, default=0.0)
    add("--batch_size", type=int, default=256)
    add("--epochs", type=int, default=100)
    add("--warmup_epochs", type=float, default=0)
    add_run_flags(add, "runs/linprobe")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    checks = FlagChecks(args)
    checks.positive("lr", "batch_size", "epochs", "extract_batch_size", "input_size", "block", "num_heads")
    checks.non_negative("weight_decay", "warmup_epochs", "num_workers")
    args.device = resolve_device(args.device)
    check_output_dir(args.output)
    check_output_dir(args.cache, "--cache")
    resolve_train_val(args)
    if args.lr is None:
        args.lr = 0.1 if args.opt == "sgd" else 1e-3
    args.cache = args.cache or str(Path(args.output) / "cache")
    return args


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters, then a linear layer (weights N(0, 0.01), bias 0)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def frozen_encoder(loaded: LoadedCheckpoint, args: argparse.Namespace) -> Tuple[BeitForImageClassification, str]:
    """The checkpoint's encoder in eval mode (its own position layout; tables resized if
    ``--input_size`` differs) and what loading did."""
    fields = {k: v for k, v in loaded.config.items() if k in BeitConfig.__dataclass_fields__}
    fields.update(drop_path_rate=0.0, attn_backend=args.attn, kernels=args.kernels,
                  img_size=args.input_size or fields["img_size"])
    model = BeitForImageClassification(BeitConfig(**fields), num_classes=0)
    report = load_pretrained(model, loaded.state_dict)
    return model.eval().requires_grad_(False), report.summary()


def file_list_digest(files: List[Path]) -> str:
    """Names (as bytes: any name, UTF-8 or not) and sizes; a file that cannot be stat'ed (a broken
    link) counts as size -1 and is skipped at extraction like any unreadable image."""
    h = hashlib.sha256()
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        h.update(os.fsencode(f) + f"\0{size}\n".encode())
    return h.hexdigest()


def cache_key(args: argparse.Namespace, block: int, img_size: int, train_files, val_files) -> str:
    """What the features depend on: the checkpoint file, the block, the preprocessing and the images."""
    ckpt = Path(args.checkpoint).resolve()
    stat = ckpt.stat()
    parts = {"v": CACHE_VERSION, "ckpt": str(ckpt), "size": stat.st_size, "mtime": stat.st_mtime_ns, "block": block,
             "img_size": img_size, "imagenet_mean": args.imagenet_default_mean_and_std, "amp": args.amp,
             "train": file_list_digest(train_files), "val": file_list_digest(val_files)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def extract(model: BeitForImageClassification, dataset, block: int, args, device: torch.device,
            desc: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of a whole dataset (or shard loader)."""
    loader = dataset if isinstance(dataset, ShardLoader) else ImageLoader(
        dataset, batch_size=args.extract_batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=args.no_progress, dynamic_ncols=True):
        with amp_context(args.amp, device):
            out = model.forward_features(images.to(device, non_blocking=True), return_block=block)
        feats.append(out.float().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def load_or_extract_features(args, loaded: LoadedCheckpoint, block: int) -> Tuple[Dict[str, Any], bool]:
    """The cached features for these settings, extracting and caching them first if needed."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_mean_and_std else (BEIT_MEAN, BEIT_STD)
    img_size = args.input_size or loaded.config["img_size"]
    tf = build_eval_transform(img_size, mean, std)
    if is_shard_source(args.train) or is_shard_source(args.val):
        train_ds, val_ds, classes = classification_shard_loaders(
            args.train, args.val, tf, tf, args.extract_batch_size, train_shuffled=False, num_workers=args.num_workers)
        files = train_ds.shards.files, val_ds.shards.files
    else:
        train_ds, val_ds, classes = class_folder_datasets(args.train, args.val, tf, tf, train_on_bad="drop")
        files = train_ds.files, val_ds.files
    key = cache_key(args, block, img_size, *files)
    path = Path(args.cache) / f"features-{key}.pt"
    if path.is_file():
        print(f"using cached features {path}")
        return torch.load(path, map_location="cpu", weights_only=True), True
    device = torch.device(args.device)
    model, report = frozen_encoder(loaded, args)
    print(f"encoder weights: {report}")
    model.to(device)
    train = extract(model, train_ds, block, args, device, "train features")
    val = extract(model, val_ds, block, args, device, "val features")
    data = {"train": train[0], "train_labels": train[1], "val": val[0], "val_labels": val[1], "classes": classes,
            "block": block, "checkpoint": str(args.checkpoint), "img_size": img_size}
    atomic_save(data, path)
    print(f"cached features in {path}")
    return data, False


def evaluate_probe(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    probe.eval()
    with torch.no_grad():
        logits = probe(feats)
        top1, top5 = topk_correct(logits, labels, (1, 5))
        loss = F.cross_entropy(logits, labels)
    n = max(len(labels), 1)
    return {"val_loss": float(loss), "acc1": 100.0 * float(top1) / n, "acc5": 100.0 * float(top5) / n}


def train_probe(data: Dict[str, Any], args: argparse.Namespace, log: JsonlLogger) -> Tuple[LinearProbe, Dict]:
    """Train the probe on the cached features; evaluate on val after each epoch."""
    torch.manual_seed(args.seed)
    x, y = data["train"], data["train_labels"]
    probe = LinearProbe(x.shape[1], len(data["classes"]))
    if args.opt == "sgd":
        opt = torch.optim.SGD(probe.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, math.ceil(len(x) / args.batch_size))
    schedule = cosine_schedule(args.lr, 0.0, args.epochs, steps, args.warmup_epochs)
    step, stats, best = 0, {}, 0.0
    for epoch in tqdm(range(args.epochs), desc="probe", disable=args.no_progress, dynamic_ncols=True):
        probe.train()
        order = torch.randperm(len(x))
        losses = []
        for i in range(steps):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = float(schedule[step])
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            step += 1
        stats = {"epoch": epoch + 1, "step": step, "loss": float(torch.stack(losses).mean()) if losses else math.nan,
                 **evaluate_probe(probe, data["val"], data["val_labels"])}
        best = stats["best_acc1"] = max(best, stats["acc1"])
        log.write(stats)
    return probe, stats


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = resolve_args(argv)
    loaded = load_any(args.checkpoint, args.num_heads)
    print(f"loaded {loaded.describe()}")
    depth = loaded.config["depth"]
    block = args.block if args.block is not None else max(1, depth * 3 // 4)
    if not 1 <= block <= depth:
        raise UserError(f"--block {block} is out of range: the checkpoint has blocks 1..{depth}")
    # A rerun overwrites probe.pt on purpose (a cheap, deterministic evaluation that reuses the cached
    # features); the lock keeps two runs apart.
    with claim_output(args.output, (), resume=False, overwrite=False) as out:
        return probe_and_report(args, loaded, block, out)


def probe_and_report(args: argparse.Namespace, loaded: LoadedCheckpoint, block: int, out: Path) -> int:
    """Features (cached or extracted), the probe's training, and its outputs in ``out``."""
    data, cached = load_or_extract_features(args, loaded, block)
    log_path = out / "linprobe.jsonl"
    if log_path.exists():
        log_path.unlink()  # one run per log: the probe is cheap to rerun
    probe, stats = train_probe(data, args, JsonlLogger(log_path))
    records = read_jsonl(log_path)
    atomic_save({"probe": probe.state_dict(), "block": block, "classes": data["classes"],
                 "checkpoint": str(args.checkpoint), "acc1": stats["acc1"], "acc5": stats["acc5"]}, out / "probe.pt")
    plot_curves(records, out / "curves.png", keys=("loss", "acc1"), x_key="epoch", title=f"linear probe, block {block}")
    print(f"linear probe top-1 {stats['acc1']:.2f}% (top-5 {stats['acc5']:.2f}%, best epoch "
          f"{stats['best_acc1']:.2f}%) on {len(data['val_labels'])} val images; block {block}, "
          f"{'cached' if cached else 'fresh'} features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
