"""The DALI two-view loader reading WebDataset shards (``fn.readers.webdataset``, GPU decode).

The augmentation graph is :func:`fastbeit.data.dali.two_views`, the same as for folders. Each
epoch builds the pipeline afresh: the shard order is the permutation of ``(seed, epoch)`` (the
same on every rank), DALI's reader gives rank ``r`` its ``r``-th contiguous part of the samples
in that order and shuffles within a buffer of ``buffer`` samples, with DALI's random streams
seeded by ``(seed, rank, epoch)``. Every rank runs ``total // world // batch_size`` batches.
The ``.idx`` files the shard writer leaves beside each tar spare DALI a scan of the tars.

Resuming at step ``k`` rebuilds the epoch's pipeline and runs (and discards) its first ``k``
batches: exact for the same seed, world size and batch size, at the cost of decoding the part of
the epoch already consumed. DALI cannot skip one bad sample inside a shard: on a read or decode
error the shards of this rank's part are checked with PIL, the broken ones are left out for the
rest of the run (named in a warning, counted in ``excluded``), and the pipeline is rebuilt and
replayed to where it was. Leaving a shard out shifts this rank's part of later epochs a little
(the other ranks do not know), so those epochs cover the data only approximately.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from fastbeit.data.dali import _check_args, _Config, _require_dali, check_image, dali_to_torch, two_views
from fastbeit.data.shard import SHARD_IMAGE_EXTS, ShardSet, dali_index_name, iter_shard
from fastbeit.data.shard_loader import DEFAULT_BUFFER
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD
from fastbeit.errors import UserError

__all__ = ["DaliShardLoader"]


class DaliShardLoader:
    """Batches of ``(patches, tokens)`` from shards; used like a DataLoader (``for batch in
    loader`` is one epoch of ``len(loader)`` batches; ``set_epoch(e, step)`` jumps)."""

    def __init__(self, shards: ShardSet, *, batch_size: int, input_size: int = 224, second_input_size: int = 112,
                 color_jitter: float = 0.4, mean: Sequence[float] = BEIT_MEAN, std: Sequence[float] = BEIT_STD,
                 scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 device_id: Optional[int] = None, num_threads: int = 4, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, buffer: int = DEFAULT_BUFFER, dtype: torch.dtype = torch.float32,
                 prefetch: int = 2) -> None:
        _require_dali()
        _check_args(batch_size, shard_id, num_shards, dtype, device_id)
        self.shards = shards
        self.cfg = _Config(batch_size, input_size, second_input_size, float(color_jitter), tuple(mean), tuple(std),
                           tuple(scale), tuple(ratio), device_id, max(1, num_threads), max(1, prefetch),
                           dtype == torch.float16)
        self.shard_id, self.num_shards, self.seed, self.buffer, self.dtype = shard_id, num_shards, seed, buffer, dtype
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.epoch, self._start_step = 0, 0
        self.excluded: set = set()  # shards that broke reading or decoding
        idx = [os.path.join(os.path.dirname(p), dali_index_name(os.path.basename(p))) for p in shards.paths]
        self._index_paths = idx if all(os.path.isfile(p) for p in idx) else None
        if len(self) == 0:
            raise UserError(f"{shards.total} samples give no full batch of {batch_size} per process; "
                            "lower the batch size")

    def __len__(self) -> int:
        return self.shards.total // self.num_shards // self.cfg.batch_size

    @property
    def num_samples(self) -> int:
        return len(self) * self.cfg.batch_size

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        if not 0 <= step < len(self):
            raise UserError(f"step {step} is outside epoch of {len(self)} batches")
        self.epoch, self._start_step = int(epoch), int(step)

    def state(self) -> dict:
        return {"world_size": self.num_shards, "batch_size": self.cfg.batch_size, "seed": self.seed,
                "total": self.shards.total, "shards": len(self.shards.paths), "buffer": self.buffer}

    def check_resume(self, saved: Optional[dict]) -> Optional[str]:
        if not saved or all(saved.get(k) == v for k, v in self.state().items()):
            return None
        return "the loader changed since the checkpoint: the rest of the resumed epoch is not the one it left"

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's shard order (the same on every rank), without the shards left out."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.paths))
        return np.array([i for i in order if i not in self.excluded], dtype=np.int64)

    def _build(self, epoch: int):
        from nvidia.dali import Pipeline, fn, types

        order = self._order(epoch)
        cfg = self.cfg
        seed = int(np.random.SeedSequence([self.seed, self.shard_id, epoch]).generate_state(1)[0] >> 1)
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=cfg.device_id, seed=seed,
                        prefetch_queue_depth=cfg.prefetch)
        index = {"index_paths": [self._index_paths[i] for i in order]} if self._index_paths else {}
        with pipe:
            encoded = fn.readers.webdataset(
                paths=[self.shards.paths[i] for i in order], ext=[";".join(SHARD_IMAGE_EXTS)],
                missing_component_behavior="skip", shard_id=self.shard_id, num_shards=self.num_shards,
                random_shuffle=True, initial_fill=max(1, self.buffer), name="reader", **index)
            images = fn.decoders.image(encoded, device="cpu" if cfg.device_id is None else "mixed",
                                       output_type=types.RGB)
            patches, tokens, _ = two_views(cfg, images)
            pipe.set_outputs(patches, tokens)
        pipe.build()
        return pipe

    def _rank_part(self, order: np.ndarray) -> list:
        """The shards (indices) overlapping this rank's contiguous part of the epoch's samples."""
        counts = np.asarray(self.shards.counts)[order]
        ends = np.cumsum(counts)
        total = int(ends[-1])
        lo, hi = self.shard_id * total // self.num_shards, (self.shard_id + 1) * total // self.num_shards
        return [int(i) for i, e, c in zip(order, ends, counts) if e > lo and e - c < hi]

    def _find_bad_shards(self, epoch: int) -> list:
        """Shards of this rank's part that break reading or decoding (checked with PIL)."""
        bad = []
        for i in self._rank_part(self._order(epoch)):
            try:
                for sample in iter_shard(self.shards.paths[i]):
                    ext = next(e for e in SHARD_IMAGE_EXTS if e in sample)
                    if check_image(io.BytesIO(sample[ext])) is not None:
                        raise ValueError(f"undecodable image {sample['__key__']}")
            except (tarfile.TarError, OSError, EOFError, ValueError, StopIteration) as exc:
                warnings.warn(f"leaving shard {self.shards.paths[i]} out of the DALI loader: {exc}", stacklevel=3)
                bad.append(i)
        return bad

    def _outputs(self, epoch: int, skip: int) -> Iterator:
        """The epoch's pipeline outputs after ``skip`` batches. On a data error the shards that
        cause it are left out from then on, and the pipeline is rebuilt and replayed to where it was."""
        produced = 0
        while True:
            pipe = self._build(epoch)
            try:
                for _ in range(skip + produced):
                    pipe.run()
                while True:
                    stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
                    out = pipe.run(stream) if stream is not None else pipe.run()
                    produced += 1
                    yield out
            except RuntimeError as exc:
                if not any(op in str(exc) for op in ("decoders.image", "readers.webdataset")):
                    raise
                bad = self._find_bad_shards(epoch)
                if not bad:
                    raise
                self.excluded.update(bad)
                if len(self.excluded) == len(self.shards.paths):
                    raise UserError("no shard is left that DALI can read") from None

    def __iter__(self) -> Iterator[tuple]:
        epoch, step = self.epoch, self._start_step
        self._start_step = 0
        outputs = self._outputs(epoch, step)
        for _ in range(step, len(self)):
            patches, tokens = next(outputs)
            yield dali_to_torch(patches, self.device, self.dtype), dali_to_torch(tokens, self.device, self.dtype)
        outputs.close()
        self.epoch = epoch + 1
