"""A small-scale reproduction of the paper's ablation (Table 4) on real images.

    python -m fastbeit.experiments.reproduce --data ../shared/data/imagenette --scale cpu   # minutes, a check
    python -m fastbeit.experiments.reproduce --data ../shared/data/imagenette --scale gpu   # the comparison
    python -m fastbeit.experiments.reproduce --data DATA --scale gpu --pretrain_epochs 100 --finetune_epochs 50

For each variant it pre-trains a small BEiT with ``fastbeit.pretrain``, fine-tunes it with
``fastbeit.finetune`` on the same images' classes, and reports the best top-1; the baseline is the
same model fine-tuned from scratch for the same fine-tuning budget (without layer-wise lr decay,
which only makes sense for a pre-trained stack). Variants: BEiT (blockwise masking, visual tokens),
random masking, pixel regression, and both. Writes ``results.json``, ``timings.json``, ``table.md``
and ``table.png``; finished variants are reused when the run is repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fastbeit import finetune, pretrain
from fastbeit.config import ATTN_BACKENDS, KERNEL_IMPLS
from fastbeit.data.folder import find_images
from fastbeit.errors import UserError, cli_entry
from fastbeit.validate import FlagChecks, check_output_dir


@dataclass(frozen=True)
class Variant:
    name: str
    mask_mode: Optional[str]  # None: no pre-training (from scratch)
    target: str = "tokens"


VARIANTS = (
    Variant("BEiT (blockwise masking, visual tokens)", "blockwise"),
    Variant("random masking", "random"),
    Variant("pixel regression", "blockwise", "pixels"),
    Variant("random masking + pixel regression", "random", "pixels"),
    Variant("from scratch (no pre-training)", None),
)

# The paper's Table 4 (BEiT-Base, 300 epochs; ImageNet top-1 / ADE20K mIoU), for comparison only.
PAPER_TABLE4 = {
    "BEiT (blockwise masking, visual tokens)": (82.86, 44.65),
    "random masking": (82.77, 42.93),
    "pixel regression": (81.04, 41.38),
    "random masking + pixel regression": (80.50, 37.09),
}

# Model and budget per scale. "cpu" checks that everything runs; "gpu" is the comparison: BEiT-Small
# at 112 px with 8-px patches (the same 14x14 grid, 75-patch masks and 112-px tokenizer view as
# BEiT-Base at 224 px), sized so that all five variants fit in about five minutes of one H200 on
# Imagenette's 4,000 training images. Longer budgets: --pretrain_epochs / --finetune_epochs.
SCALES: Dict[str, Dict[str, object]] = {
    "cpu": dict(model="beit_tiny", depth=2, input_size=32, patch_size=4, images_per_class=8,
                pretrain_epochs=1, finetune_epochs=1, batch_size=8, num_mask=25, min_block=4),
    # A small real comparison on a CPU (about 45 min on 2 cores for variants 1 and 5).
    "cpu-long": dict(model="beit_tiny", depth=4, input_size=64, patch_size=8, images_per_class=None,
                     pretrain_epochs=15, finetune_epochs=10, batch_size=64, num_mask=25, min_block=4),
    "gpu": dict(model="beit_small", depth=12, input_size=112, patch_size=8, images_per_class=None,
                pretrain_epochs=20, finetune_epochs=12, batch_size=128, num_mask=75, min_block=16),
}


def default_workers() -> int:
    """Data workers: all cores but two for the training process (at least 2, at most 12)."""
    return max(2, min(12, (os.cpu_count() or 2) - 2))


def subset_folder(src: Path, dst: Path, per_class: Optional[int]) -> Path:
    """Link up to ``per_class`` images of each class folder of ``src`` into ``dst`` (all if None)."""
    if per_class is None:
        return src
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        target = dst / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for image in find_images(class_dir)[:per_class]:
            link = target / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return dst


def shared_args(s: Dict, out: Path, run: argparse.Namespace) -> List[str]:
    """Flags pre-training and fine-tuning share: the model, the batch, precision and backends."""
    return ["--model", str(s["model"]), "--depth", str(s["depth"]), "--input_size", str(s["input_size"]),
            "--patch_size", str(s["patch_size"]), "--batch_size", str(s["batch_size"]), "--amp", run.amp,
            "--attn", run.attn, "--kernels", run.kernels, "--num_workers", str(run.num_workers),
            "--output", str(out), "--resume", "auto", "--no_progress"]


def pretrain_args(v: Variant, s: Dict, data: Path, out: Path, run: argparse.Namespace) -> List[str]:
    grid = int(s["input_size"]) // int(s["patch_size"])
    epochs = int(s["pretrain_epochs"])
    args = shared_args(s, out, run) + [
        "--data", str(data), "--second_input_size", str(8 * grid), "--epochs", str(epochs),
        "--warmup_epochs", str(max(1, epochs // 10)), "--save_ckpt_freq", str(epochs),
        "--num_mask_patches", str(s["num_mask"]), "--min_mask_patches_per_block", str(s["min_block"]),
        "--mask_mode", str(v.mask_mode), "--target", v.target]
    if run.tokenizer:
        args += ["--tokenizer", run.tokenizer]
    return args


def finetune_args(s: Dict, train: Path, val: Path, out: Path, run: argparse.Namespace,
                  checkpoint: Optional[Path]) -> List[str]:
    epochs = int(s["finetune_epochs"])
    args = shared_args(s, out, run) + [
        "--train", str(train), "--val", str(val), "--epochs", str(epochs),
        "--warmup_epochs", str(max(1, epochs // 10)), "--save_ckpt_freq", str(epochs)]
    # Layer-wise lr decay shrinks the lower layers' steps to keep pre-trained features; a random
    # stack has none to keep, so the from-scratch baseline trains every layer at the full rate.
    args += ["--finetune", str(checkpoint)] if checkpoint is not None else ["--layer_decay", "1.0"]
    return args


def run_variant(v: Variant, s: Dict, train: Path, val: Path, out: Path, run: argparse.Namespace) -> float:
    """Pre-train (unless from scratch) and fine-tune; return the best validation top-1 (%)."""
    slug = v.name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
    ckpt = None
    if v.mask_mode is not None:
        pt_out = out / f"pretrain_{slug}"
        code = pretrain.main(pretrain_args(v, s, train, pt_out, run))
        if code != 0:
            raise UserError(f"pre-training for {v.name!r} stopped with status {code}")
        ckpt = pt_out / "checkpoint.pt"
    ft_out = out / f"finetune_{slug}"
    code = finetune.main(finetune_args(s, train, val, ft_out, run, ckpt))
    if code not in (0, None):
        raise UserError(f"fine-tuning for {v.name!r} stopped with status {code}")
    return float(torch.load(ft_out / "last.pt", map_location="cpu", weights_only=False)["best_acc1"])


def describe(s: Dict) -> str:
    """One line saying what was trained, for under the table."""
    return (f"{s['model']} (depth {s['depth']}) at {s['input_size']} px, {s['patch_size']}-px patches, batch "
            f"{s['batch_size']}; pre-training {s['pretrain_epochs']} epochs, fine-tuning {s['finetune_epochs']} "
            "epochs; top-1 is the best validation epoch. From scratch: the same fine-tuning run on a random "
            "init, without layer-wise lr decay.")


def write_table(results: Dict[str, float], scale: str, out: Path, note: str = "") -> str:
    lines = [f"| Models (scale `{scale}`) | top-1 here (%) | paper: ImageNet top-1 | paper: ADE20K mIoU |",
             "|---|---:|---:|---:|"]
    for name, acc in results.items():
        paper = PAPER_TABLE4.get(name)
        ref = f"{paper[0]:.2f} | {paper[1]:.2f}" if paper else "– | –"
        lines.append(f"| {name} | {acc:.2f} | {ref} |")
    table = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    (out / "table.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(results)
    ax.barh(names[::-1], [results[n] for n in names][::-1], color="tab:blue")
    ax.set_xlabel("best validation top-1 (%)")
    ax.set_title(f"BEiT ablation, small-scale reproduction ({scale})")
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=100)
    plt.close(fig)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.experiments.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/ (e.g. Imagenette)")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--output", default="runs/reproduce")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the visual-token variants (default: shipped)")
    p.add_argument("--variants", default=None, help="comma-separated variant numbers 1-5, run in the order given")
    p.add_argument("--pretrain_epochs", type=int, default=None, help="override the scale's pre-training epochs")
    p.add_argument("--finetune_epochs", type=int, default=None, help="override the scale's fine-tuning epochs")
    p.add_argument("--num_workers", type=int, default=default_workers(), help="data workers per run")
    p.add_argument("--attn", choices=ATTN_BACKENDS, default="auto", help="attention backend for every run")
    p.add_argument("--kernels", choices=KERNEL_IMPLS, default="auto", help="fused kernels or references")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    FlagChecks(args).non_negative("num_workers")
    check_output_dir(args.output)
    data = Path(args.data)
    train, val = data / "train", data / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise UserError(f"{folder} not found: --data needs train/ and val/ class folders")
    scale = dict(SCALES[args.scale])
    for key in ("pretrain_epochs", "finetune_epochs"):
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{key} must be positive, got {value}")
            scale[key] = value
    chosen = VARIANTS
    if args.variants:
        try:
            chosen = tuple(VARIANTS[int(i) - 1] for i in args.variants.split(","))
        except (ValueError, IndexError):
            raise UserError(f"--variants takes numbers 1-{len(VARIANTS)}, got {args.variants!r}") from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: Dict[str, float] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    timings_path = out / "timings.json"
    timings: Dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        per_class = scale["images_per_class"]
        train_sub = subset_folder(train, Path(tmp) / "train", per_class)
        val_sub = subset_folder(val, Path(tmp) / "val", None if per_class is None else max(2, int(per_class) // 2))
        for v in chosen:
            if v.name in results:
                print(f"[reproduce] {v.name}: {results[v.name]:.2f}% (already measured)")
                continue
            print(f"[reproduce] {v.name} ...", flush=True)
            start = time.perf_counter()
            results[v.name] = run_variant(v, scale, train_sub, val_sub, out, args)
            timings[v.name] = round(time.perf_counter() - start, 1)
            print(f"[reproduce] {v.name}: {results[v.name]:.2f}% in {timings[v.name]:.0f} s", flush=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    table = write_table({v.name: results[v.name] for v in VARIANTS if v.name in results}, args.scale, out,
                        describe(scale))
    print(table + f"written: {out / 'table.md'}, {out / 'table.png'}, {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
