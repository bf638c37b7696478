"""Copy an image-class tree (train/<class>/, val/<class>/) at a small size, for a GPU call.

    python benchmarks/shrink_images.py ../shared/data/imagenette .gpudata/imagenette128 --val-per-class 200

A device call carries at most 64 MiB with it; Imagenette's 224-px JPEGs are 96 MiB. The
reproduction trains at 112 px, so a 128-px copy (shorter side, JPEG quality 90) loses nothing it
uses: 4,000 training and 2,000 validation images come to about 40 MiB.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image

from fastbeit.data.folder import find_images


def shrink(job: Tuple[Path, Path, int, int]) -> None:
    src, dst, size, quality = job
    image = Image.open(src).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst.with_suffix(".jpg"), quality=quality)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--size", type=int, default=128, help="shorter side in pixels")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--val-per-class", type=int, default=None, help="keep the first N validation images a class")
    args = p.parse_args(argv)
    jobs = []
    for split in ("train", "val"):
        for class_dir in sorted(d for d in (args.src / split).iterdir() if d.is_dir()):
            images = find_images(class_dir)
            if split == "val" and args.val_per_class is not None:
                images = images[: args.val_per_class]
            jobs += [(f, args.dst / split / class_dir.name / f.name, args.size, args.quality) for f in images]
    with ProcessPoolExecutor() as pool:
        list(pool.map(shrink, jobs, chunksize=64))
    print(f"{len(jobs)} images written under {args.dst}")


if __name__ == "__main__":
    main()
