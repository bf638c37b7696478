"""A small-scale reproduction of the paper's ablation (Table 4) on real images.

    python -m fastbeit.experiments.reproduce --data ../shared/data/imagenette --scale cpu   # minutes, a check
    python -m fastbeit.experiments.reproduce --data ../shared/data/imagenette --scale gpu   # the comparison

For each variant it pre-trains a small BEiT with ``fastbeit.pretrain``, fine-tunes it with
``fastbeit.finetune`` on the same images' classes, and reports the best top-1; the baseline is the
same model fine-tuned from scratch for the same fine-tuning budget. Variants: BEiT (blockwise
masking, visual tokens), random masking, pixel regression, and both. Writes ``results.json``,
``table.md`` and ``table.png``; finished variants are reused when the run is repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fastbeit import finetune, pretrain
from fastbeit.data.folder import find_images
from fastbeit.errors import UserError, cli_entry


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

# Model and budget per scale. "cpu" checks that everything runs; "gpu" is the real comparison.
SCALES: Dict[str, Dict[str, object]] = {
    "cpu": dict(model="beit_tiny", depth=2, input_size=32, patch_size=4, images_per_class=8,
                pretrain_epochs=1, finetune_epochs=1, batch_size=8, num_mask=25, min_block=4),
    "gpu": dict(model="beit_small", depth=12, input_size=112, patch_size=8, images_per_class=None,
                pretrain_epochs=100, finetune_epochs=50, batch_size=128, num_mask=75, min_block=16),
}


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


def pretrain_args(v: Variant, s: Dict, data: Path, out: Path, amp: str, tokenizer: Optional[str]) -> List[str]:
    grid = int(s["input_size"]) // int(s["patch_size"])
    args = ["--data", str(data), "--model", str(s["model"]), "--depth", str(s["depth"]),
            "--input_size", str(s["input_size"]), "--patch_size", str(s["patch_size"]),
            "--second_input_size", str(8 * grid), "--batch_size", str(s["batch_size"]),
            "--epochs", str(s["pretrain_epochs"]), "--warmup_epochs", str(max(1, int(s["pretrain_epochs"]) // 10)),
            "--num_mask_patches", str(s["num_mask"]), "--min_mask_patches_per_block", str(s["min_block"]),
            "--mask_mode", str(v.mask_mode), "--target", v.target, "--amp", amp, "--output", str(out),
            "--num_workers", "2", "--resume", "auto", "--no_progress"]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    return args


def finetune_args(s: Dict, train: Path, val: Path, out: Path, amp: str, checkpoint: Optional[Path]) -> List[str]:
    args = ["--train", str(train), "--val", str(val), "--model", str(s["model"]), "--depth", str(s["depth"]),
            "--input_size", str(s["input_size"]), "--patch_size", str(s["patch_size"]),
            "--batch_size", str(s["batch_size"]), "--epochs", str(s["finetune_epochs"]),
            "--warmup_epochs", str(max(1, int(s["finetune_epochs"]) // 10)), "--amp", amp, "--output", str(out),
            "--num_workers", "2", "--resume", "auto", "--no_progress"]
    if checkpoint is not None:
        args += ["--finetune", str(checkpoint)]
    return args


def run_variant(v: Variant, s: Dict, train: Path, val: Path, out: Path, amp: str, tokenizer: Optional[str]) -> float:
    """Pre-train (unless from scratch) and fine-tune; return the best validation top-1 (%)."""
    slug = v.name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
    ckpt = None
    if v.mask_mode is not None:
        pt_out = out / f"pretrain_{slug}"
        code = pretrain.main(pretrain_args(v, s, train, pt_out, amp, tokenizer))
        if code != 0:
            raise UserError(f"pre-training for {v.name!r} stopped with status {code}")
        ckpt = pt_out / "checkpoint.pt"
    ft_out = out / f"finetune_{slug}"
    code = finetune.main(finetune_args(s, train, val, ft_out, amp, ckpt))
    if code not in (0, None):
        raise UserError(f"fine-tuning for {v.name!r} stopped with status {code}")
    return float(torch.load(ft_out / "last.pt", map_location="cpu", weights_only=False)["best_acc1"])


def write_table(results: Dict[str, float], scale: str, out: Path) -> str:
    lines = [f"| Models (scale `{scale}`) | top-1 here (%) | paper: ImageNet top-1 | paper: ADE20K mIoU |",
             "|---|---:|---:|---:|"]
    for name, acc in results.items():
        paper = PAPER_TABLE4.get(name)
        ref = f"{paper[0]:.2f} | {paper[1]:.2f}" if paper else "– | –"
        lines.append(f"| {name} | {acc:.2f} | {ref} |")
    table = "\n".join(lines) + "\n"
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
    p.add_argument("--variants", default=None, help="comma-separated subset of variant numbers 1-5")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    data = Path(args.data)
    train, val = data / "train", data / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise UserError(f"{folder} not found: --data needs train/ and val/ class folders")
    scale = SCALES[args.scale]
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
    with tempfile.TemporaryDirectory() as tmp:
        per_class = scale["images_per_class"]
        train_sub = subset_folder(train, Path(tmp) / "train", per_class)
        val_sub = subset_folder(val, Path(tmp) / "val", None if per_class is None else max(2, int(per_class) // 2))
        for v in chosen:
            if v.name in results:
                print(f"[reproduce] {v.name}: {results[v.name]:.2f}% (already measured)")
                continue
            print(f"[reproduce] {v.name} ...")
            results[v.name] = run_variant(v, scale, train_sub, val_sub, out, args.amp, args.tokenizer)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    table = write_table({v.name: results[v.name] for v in VARIANTS if v.name in results}, args.scale, out)
    print(table + f"written: {out / 'table.md'}, {out / 'table.png'}, {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
