"""Loader throughput: decode + both BEiT views, DALI vs the torchvision DataLoader, from folders and shards.

Each round is one epoch over the same fixed ``BENCH_IMAGES`` Imagenette files, with the same
number of DataLoader workers as DALI threads (``BENCH_WORKERS``) and batch ``BENCH_BATCH``.
Loaders are built and warmed up (one epoch) outside the timing; DataLoader workers persist.
Images per second go to ``benchmark.extra_info["images_per_s"]``.

    pytest benchmarks/test_bench_loader.py --benchmark-only
    BENCH_IMAGES=256 BENCH_WORKERS=2 pytest benchmarks/test_bench_loader.py --benchmark-only
"""

import os
import pathlib
import shutil

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from fastbeit.data.folder import ImageFolderDataset, find_images
from fastbeit.data.transforms import BeitPretrainTransform, TwoViewTransform

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette" / "train"
N_IMAGES = int(os.environ.get("BENCH_IMAGES", "256"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
BATCH = int(os.environ.get("BENCH_BATCH", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def bench_files():
    """A fixed spread of ``N_IMAGES`` files from the Imagenette train split."""
    if not DATA.is_dir():
        pytest.skip(f"Imagenette not found at {DATA}")
    files = find_images(DATA)
    step = max(1, len(files) // N_IMAGES)
    return files[::step][:N_IMAGES]


def _epoch(loader, sync: bool = False) -> int:
    """Consume one epoch; the image count (after the GPU has finished, with ``sync``)."""
    seen = sum(batch[0].shape[0] for batch in loader)
    if sync:
        torch.cuda.synchronize()
    return seen


def _measure(benchmark, loader, name: str, sync: bool = False) -> None:
    _epoch(loader, sync)  # warm-up: worker start-up, pipeline build, page cache
    seen = benchmark.pedantic(_epoch, args=(loader, sync), rounds=ROUNDS, iterations=1)
    assert seen == N_IMAGES - N_IMAGES % BATCH
    benchmark.extra_info.update({"loader": name, "images": seen, "threads": WORKERS, "batch_size": BATCH})
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["images_per_s"] = round(seen / benchmark.stats.stats.mean, 1)
    if sync:
        benchmark.extra_info["device"] = torch.cuda.get_device_name()


def test_torchvision_dataloader(benchmark, bench_files):
    dataset = ImageFolderDataset(DATA, BeitPretrainTransform(TwoViewTransform(), None))
    index = {str(f): i for i, f in enumerate(dataset.files)}
    subset = Subset(dataset, [index[str(f)] for f in bench_files])
    loader = DataLoader(subset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True,
                        persistent_workers=WORKERS > 0)
    _measure(benchmark, loader, "torchvision DataLoader")


def _dali_loader(files, device_id):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    from fastbeit.data.dali import DaliPretrainLoader

    return DaliPretrainLoader(files=files, batch_size=BATCH, num_threads=WORKERS, device_id=device_id)


def test_dali_cpu(benchmark, bench_files):
    _measure(benchmark, _dali_loader(bench_files, None), "DALI cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the DALI GPU pipeline needs CUDA")
def test_dali_gpu(benchmark, bench_files):
    _measure(benchmark, _dali_loader(bench_files, torch.cuda.current_device()), "DALI gpu (mixed)", sync=True)


@pytest.fixture(scope="module")
def bench_shards(bench_files, tmp_path_factory):
    """The same files written as WebDataset shards of 64 (``python -m fastbeit.data.shard``)."""
    from fastbeit.data.shard import resolve_shards, write_shards

    root = tmp_path_factory.mktemp("bench_images")
    for f in bench_files:
        (root / f.parent.name).mkdir(exist_ok=True)
        shutil.copy(f, root / f.parent.name / f.name)
    write_shards(root, root.parent / "bench_shards", shard_size=64, progress=False)
    return resolve_shards(str(root.parent / "bench_shards"))


def test_torch_shard_loader(benchmark, bench_shards):
    from fastbeit.data.shard_loader import SampleDecoder, ShardLoader

    loader = ShardLoader(bench_shards, SampleDecoder(BeitPretrainTransform(TwoViewTransform(), None)), BATCH,
                         num_workers=WORKERS)
    _measure(benchmark, loader, "torch shard loader")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the DALI GPU pipeline needs CUDA")
def test_dali_shards_gpu(benchmark, bench_shards):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    from fastbeit.data.dali_shards import DaliShardLoader

    loader = DaliShardLoader(bench_shards, batch_size=BATCH, num_threads=WORKERS,
                             device_id=torch.cuda.current_device())
    _measure(benchmark, loader, "DALI gpu (mixed), shards", sync=True)
