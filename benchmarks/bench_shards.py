"""Shard loader vs folder loader on the CPU, side by side: the same images, transform, workers, batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_shards.py --images 512 --workers 2 --repeats 5

Copies ``--images`` Imagenette train JPEGs (an even spread) into a temporary folder, writes them as
shards (``--shard-size``), then alternates one epoch of each loader (folder first, then shards, then
folder, ...) so a busy shared machine slows both alike; prints img/s per epoch and the ratio of each
adjacent pair, and their median. Work per image: decode + the BEiT two-view transform + a mask
(``BeitPretrainTransform``), as pre-training does. One warm-up epoch each, untimed.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastbeit.data.folder import ImageFolderDataset, find_images
from fastbeit.data.sampler import ResumableSampler
from fastbeit.data.shard import resolve_shards, write_shards
from fastbeit.data.shard_loader import SampleDecoder, ShardLoader
from fastbeit.data.transforms import BeitPretrainTransform, TwoViewTransform
from fastbeit.masking import MaskingGenerator

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette" / "train"


def pretrain_transform() -> BeitPretrainTransform:
    return BeitPretrainTransform(TwoViewTransform(), MaskingGenerator(14, 75, min_num_patches=16))


def decode_only(img) -> tuple:
    return (torch.zeros(1),)


def read_rates(root: Path, shard_dir: Path) -> tuple:
    """Raw bytes only (no decoding), in this process: files opened one by one vs tars streamed."""
    from fastbeit.data.shard import iter_shard

    start = time.perf_counter()
    n_files = sum(len(f.read_bytes()) > 0 for f in find_images(root))
    files_rate = n_files / (time.perf_counter() - start)
    start = time.perf_counter()
    n_tar = sum(1 for p in resolve_shards(str(shard_dir)).paths for _ in iter_shard(p))
    return files_rate, n_tar / (time.perf_counter() - start)


def epoch_rate(loader) -> float:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", choices=("transform", "decode"), default="transform",
                   help="transform: decode + two views + mask (pre-training's work); decode: decode to RGB only")
    args = p.parse_args()
    torch.set_num_threads(1)
    files = find_images(args.data)
    files = files[:: max(1, len(files) // args.images)][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for f in files:
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / f.parent.name / f.name)
        write_shards(root, Path(tmp) / "shards", shard_size=args.shard_size, progress=False)
        work = pretrain_transform() if args.work == "transform" else decode_only
        dataset = ImageFolderDataset(root, work)
        sampler = ResumableSampler(len(dataset), args.batch)
        folder = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler,
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)  # as the shard loader's
        shards = ShardLoader(resolve_shards(str(Path(tmp) / "shards")), SampleDecoder(work),
                             args.batch, num_workers=args.workers)
        epoch_rate(folder), epoch_rate(shards)  # warm-up: page cache, imports in the workers
        rows = []
        for r in range(args.repeats):
            sampler.set_epoch(r)
            f_rate, s_rate = epoch_rate(folder), epoch_rate(shards)
            rows.append((f_rate, s_rate, s_rate / f_rate))
            print(f"repeat {r}: folder {f_rate:7.1f} img/s   shards {s_rate:7.1f} img/s   ratio {s_rate / f_rate:.2f}",
                  flush=True)
        files_rate, tar_rate = read_rates(root, Path(tmp) / "shards")
        print(f"raw reads (page cache, one process): files {files_rate:.0f}/s, tar samples {tar_rate:.0f}/s")
    ratios = [row[2] for row in rows]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{args.work}, {len(files)} images, {args.workers} workers, batch {args.batch}: "
          f"median ratio {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}); median folder "
          f"{statistics.median(r[0] for r in rows):.1f}, shards {statistics.median(r[1] for r in rows):.1f} img/s")


if __name__ == "__main__":
    main()
