"""The torch loader for WebDataset shards: split by rank and worker, shuffled, resumable mid-epoch.

Reading is :func:`fastbeit.data.shard.iter_shard` (one sequential pass per shard, headers parsed
there), not the ``webdataset`` package: the loader needs to own the split, the per-worker sample
quotas, the resume position and the count of truncated shards, which webdataset's pipeline
stages do not expose. The shards are standard WebDataset tars all the same (the tests read them
with ``webdataset`` when it is installed).

An epoch, for rank ``r`` of ``world`` with ``W`` workers:

1. the shard order is a permutation drawn from ``(seed, epoch)``, the same on every rank;
2. shards go, in that order, to the ``world * W`` (rank, worker) slots, each to the slot holding
   the fewest samples so far (counts come from the index), so slots differ by under one shard;
3. every rank runs ``total // world // batch_size`` steps (equal on all ranks, as DDP needs);
   step ``s`` is worker ``s % W``'s next batch, and a worker reads its shards, then (if they
   ran short of its quota) reads them again in a new order; what is left over is dropped.
   With equal slots (shard counts that divide evenly) the world's epoch is every sample once;
4. a worker streams raw samples through a shuffle buffer (``buffer`` samples, seeded by
   ``(seed, epoch, slot, pass)``, emptied at the end of each pass over its shards) and decodes
   after it; the augmentation's random draws are seeded per batch by ``(seed, epoch, rank, step)``.

Resuming at step ``k`` of an epoch replays each worker's reading (tar bytes and the buffer, no
decoding) up to its position and rotates the workers so batch ``k`` comes next: the rest of the
epoch is bit-for-bit the batches an uninterrupted run would have seen, provided the number of
processes, workers, batch size and seed are unchanged and no corrupt sample was met before the
resume point (each one shifts that worker's stream by a sample). Replaying costs one read of
the part of the epoch already consumed (on each rank only its own shards).

Corrupt samples (undecodable image, missing ``.cls`` where labels are needed) are skipped and
replaced by the next sample; a truncated shard (a tar error, or fewer samples than the index
says) is abandoned where it breaks. Both are counted and reported once per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import io
import random
import tarfile
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from fastbeit.data.shard import SHARD_IMAGE_EXTS, ShardSet, is_shard_source, iter_shard, resolve_shards
from fastbeit.data.workers import data_loader
from fastbeit.errors import UserError

DEFAULT_BUFFER = 1000
BAD_SAMPLES, BAD_SHARDS = 0, 1


class BadSample(ValueError):
    """A sample that cannot be used (skipped and counted, never fatal)."""


class SampleDecoder:
    """Raw sample → ``transform(RGB image)`` (a tuple is flattened), then the label and/or key."""

    def __init__(self, transform: Callable, labels: bool = False, keys: bool = False) -> None:
        self.transform, self.labels, self.keys = transform, labels, keys

    def __call__(self, sample: Dict[str, bytes]) -> tuple:
        ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample("no image in the sample")
        if self.labels and "cls" not in sample:
            raise BadSample("no .cls label")
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                img.load()
                img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BadSample(f"{type(exc).__name__}: {exc}") from None
        out = self.transform(img)
        out = tuple(out) if isinstance(out, tuple) else (out,)
        if self.labels:
            out += (int(sample["cls"]),)
        if self.keys:
            out += (sample["__key__"],)
        return out


def assign_shards(counts: List[int], slots: int, order: np.ndarray) -> List[List[int]]:
    """Shard indices per slot: in ``order``, each shard to the slot with the fewest samples so far."""
    heap = [(0, slot) for slot in range(slots)]
    out: List[List[int]] = [[] for _ in range(slots)]
    for i in order:
        load, slot = heapq.heappop(heap)
        out[slot].append(int(i))
        heapq.heappush(heap, (load + counts[i], slot))
    return out


def shuffle_buffer(stream: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Samples of ``stream`` in a random order drawn within a buffer of ``size``."""
    buf: List = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


@contextlib.contextmanager
def seeded(seed_words: List[int], restore: bool) -> Iterator[None]:
    """Seed python, numpy and torch from ``seed_words``; with ``restore`` put their states back after."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    state = np.random.SeedSequence(seed_words).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, from the (epoch, start step) in the loader's shared ``position``,
    read when iteration starts (so persistent workers pick up each new epoch); each DataLoader
    worker plays one slot."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader, self.epoch, self.start_step = loader, 0, 0

    def _read(self, shard: int, worker: int) -> Iterator[Dict[str, bytes]]:
        ld = self.loader
        path, expected, n = ld.shards.paths[shard], ld.shards.counts[shard], 0
        try:
            for sample in iter_shard(path):
                n += 1
                yield sample
        except (tarfile.TarError, OSError, EOFError) as exc:
            ld.stats[worker, BAD_SHARDS] += 1
            warnings.warn(f"skipping the rest of shard {path} after {n} samples (truncated?): {exc}", stacklevel=2)
            return
        if n < expected:
            ld.stats[worker, BAD_SHARDS] += 1
            warnings.warn(f"shard {path} ended after {n} of its {expected} samples (truncated?)", stacklevel=2)

    def _samples(self, slot: int, worker: int) -> Iterator[Dict[str, bytes]]:
        ld = self.loader
        mine = ld.assignment(self.epoch)[slot]
        for rnd in range(1 << 30):
            rng = np.random.default_rng([ld.seed, self.epoch, slot, rnd])
            order = mine if rnd == 0 else rng.permutation(mine)
            stream = (sample for shard in order for sample in self._read(int(shard), worker))
            got = 0
            for sample in shuffle_buffer(stream, ld.buffer, rng) if ld.shuffle else stream:  # flushed every round
                got += 1
                yield sample
            if not ld.train:
                return
            if got == 0:
                raise UserError(f"none of the shards {[ld.shards.paths[i] for i in mine][:3]} gave a sample")

    def __iter__(self) -> Iterator:
        ld, info = self.loader, torch.utils.data.get_worker_info()
        self.epoch, self.start_step = (int(v) for v in ld.position.tolist())
        worker = info.id if info is not None else 0
        slot_in_rank = (worker + self.start_step) % ld.workers  # rotated so batch start_step comes first
        slot, bsz = ld.rank * ld.workers + slot_in_rank, ld.batch_size
        raw = self._samples(slot, worker)
        if not ld.train:
            yield from self._eval_batches(raw, worker)
            return
        steps = range(slot_in_rank, len(ld), ld.workers)
        done = len(range(slot_in_rank, self.start_step, ld.workers))
        for _ in range(done * bsz):  # replay to the resume position without decoding
            next(raw)
        for step in steps[done:]:
            with seeded([ld.seed, self.epoch, ld.rank, step], restore=info is None):
                yield self._collate([self._next_good(raw, worker) for _ in range(bsz)])

    def _next_good(self, raw: Iterator, worker: int) -> tuple:
        for sample in raw:
            try:
                return self.loader.decode(sample)
            except BadSample as exc:
                self.loader.stats[worker, BAD_SAMPLES] += 1
                warnings.warn(f"skipping sample {sample.get('__key__')}: {exc}", stacklevel=2)
        raise StopIteration

    def _eval_batches(self, raw: Iterator, worker: int) -> Iterator:
        items = []
        while True:
            try:
                items.append(self._next_good(raw, worker))
            except StopIteration:
                break
            if len(items) == self.loader.batch_size:
                yield self._collate(items)
                items = []
        if items:
            yield self._collate(items)

    @staticmethod
    def _collate(items: List[tuple]) -> tuple:
        return tuple(torch.utils.data.default_collate(list(col)) if not isinstance(col[0], str) else list(col)
                     for col in zip(*items))


class ShardLoader:
    """Batches from shards, used like a DataLoader: ``for batch in loader`` runs one epoch and
    moves on; ``set_epoch(e, step)`` jumps (resuming). ``train=True``: shuffled, ``len(loader)``
    batches on every rank; ``train=False``: in order, every sample once over the world (the last
    batch may be short). ``stats`` counts skipped samples and truncated shards per worker."""

    def __init__(self, shards: ShardSet, decode: Callable[[Dict[str, bytes]], tuple], batch_size: int, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0, train: bool = True,
                 buffer: int = DEFAULT_BUFFER, pin_memory: bool = False, report: bool = True) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad loader settings: batch_size {batch_size}, rank {rank} of {world_size}")
        if train and len(shards.paths) < world_size:
            raise UserError(f"{len(shards.paths)} shards cannot be split over {world_size} processes; write more, "
                            "smaller shards (python -m fastbeit.data.shard --shard-size N)")
        self.shards, self.decode, self.batch_size = shards, decode, batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.shuffle, self.buffer, self.pin_memory, self.report = train, max(1, buffer), pin_memory, report
        self.num_workers = max(0, num_workers)
        self.workers = max(1, min(self.num_workers, len(shards.paths) // world_size))  # slots per rank
        if train and report and self.num_workers > self.workers:
            warnings.warn(f"{len(shards.paths)} shards over {world_size} process(es) keep only {self.workers} of the "
                          f"{self.num_workers} workers busy; write more, smaller shards", stacklevel=2)
        self.stats = torch.zeros(self.workers, 2, dtype=torch.int64).share_memory_()
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start step) for the workers
        self.epoch, self._start_step = 0, 0
        self._loader: Optional[torch.utils.data.DataLoader] = None
        if train and len(self) == 0:
            raise UserError(f"{shards.total} samples give no full batch of {batch_size} per process; "
                            "lower the batch size")

    def __len__(self) -> int:
        """Batches per epoch on this rank (training: the same on every rank)."""
        if self.train:
            return self.shards.total // self.world_size // self.batch_size
        return -(-self.num_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (training: its quota)."""
        if self.train:
            return len(self) * self.batch_size
        return sum(self.shards.counts[i] for slot in self.rank_slots(0) for i in slot)

    def assignment(self, epoch: int) -> List[List[int]]:
        """Shard indices of every (rank, worker) slot in ``epoch`` (slot = rank * workers + worker)."""
        n = len(self.shards.paths)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return assign_shards(self.shards.counts, self.world_size * self.workers, order)

    def rank_slots(self, epoch: int) -> List[List[int]]:
        return self.assignment(epoch)[self.rank * self.workers : (self.rank + 1) * self.workers]

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Make the next ``for`` loop run epoch ``epoch`` from batch ``step``."""
        if step and not (self.train and 0 <= step < len(self)):
            raise UserError(f"step {step} is outside an epoch of {len(self)} batches")
        self.epoch, self._start_step = int(epoch), int(step)

    def state(self) -> Dict[str, int]:
        """What must match for an exact mid-epoch resume (saved in the checkpoint)."""
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
                "seed": self.seed, "total": self.shards.total, "shards": len(self.shards.paths),
                "buffer": self.buffer}

    def check_resume(self, saved: Optional[Dict[str, int]]) -> Optional[str]:
        """A warning when a checkpoint's loader state differs (the rest of that epoch is then a fresh split)."""
        if not saved or saved == self.state():
            return None
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in self.state().items() if saved.get(k) != v)
        return (f"the shard loader changed since the checkpoint ({diff}): the rest of the resumed epoch is read "
                "with the new split, so a few samples may repeat or be missed until it ends")

    def __iter__(self) -> Iterator[tuple]:
        epoch, step = self.epoch, self._start_step
        self._start_step = 0
        before = self.stats.sum(0).tolist()
        self.position.copy_(torch.tensor([epoch, step]))
        if self._loader is None:  # workers persist across epochs
            workers = self.workers if self.num_workers > 0 else 0
            spec = copy.copy(self)  # the same settings and shared tensors, without the DataLoader: no cycle,
            spec._loader = None  # so dropping this loader shuts its workers down at once
            self._loader = data_loader(_EpochStream(spec), batch_size=None, num_workers=workers,  # signal-safe
                                       pin_memory=self.pin_memory, persistent_workers=workers > 0)
        yield from self._loader
        self.epoch = epoch + 1
        bad, shards = (a - b for a, b in zip(self.stats.sum(0).tolist(), before))
        if self.report and (bad or shards):
            warnings.warn(f"epoch {epoch}: skipped {bad} corrupt samples; {shards} shard reads broke off "
                          "(truncated shards, skipped from where they break)", stacklevel=2)


def classification_shard_loaders(train: str, val: str, train_tf: Callable, val_tf: Callable, batch_size: int, *,
                                 nb_classes: Optional[int] = None, train_shuffled: bool = True,
                                 **kwargs) -> Tuple[ShardLoader, ShardLoader, List[str]]:
    """Labelled train (shuffled, equal steps per rank; with ``train_shuffled=False`` read like val)
    and val (in order, every sample once) shard loaders sharing one class list; ``kwargs`` go to
    both :class:`ShardLoader`s."""
    from fastbeit.data.classification import check_nb_classes

    if not (is_shard_source(train) and is_shard_source(val)):
        raise UserError(f"give training and validation data both as shards or both as folders ({train}, {val})")
    train_set, val_set = resolve_shards(train), resolve_shards(val)
    classes = train_set.require_labels()
    if val_set.require_labels() != classes:
        raise UserError(f"the class lists of the shard indexes of {train} and {val} differ")
    check_nb_classes(nb_classes, classes, train)
    train_loader = ShardLoader(train_set, SampleDecoder(train_tf, labels=True), batch_size, train=train_shuffled,
                               **kwargs)
    val_loader = ShardLoader(val_set, SampleDecoder(val_tf, labels=True), batch_size, train=False, **kwargs)
    return train_loader, val_loader, classes
