"""The BEiT two-view augmentation as an NVIDIA DALI pipeline (GPU decode; CPU mode for tests).

Per image, the same recipe as :class:`fastbeit.data.transforms.TwoViewTransform`:

1. read + decode to RGB (``device='mixed'`` with a GPU, ``'cpu'`` with ``device_id=None``);
   greyscale and CMYK files come out as RGB;
2. ONE random-resized-crop box (``fn.random_crop_generator``: area fraction uniform in
   ``scale``, aspect log-uniform in ``ratio``, 10 tries then a centre crop, as torchvision),
   resized twice: ``input_size`` bicubic (``INTERP_CUBIC``) and ``second_input_size`` Lanczos
   (``INTERP_LANCZOS3``), both with antialiasing like PIL;
3. colour jitter with brightness, contrast and saturation factors each uniform in
   ``[1 - color_jitter, 1 + color_jitter]``, no hue, the same factors for both views;
4. one coin per image flips both views (``crop_mirror_normalize(mirror=coin)``);
5. patch view ``(x/255 - mean)/std``, token view ``map_pixels(x/255)``, channels first.

Where it differs from torchvision, and why that does not change the distribution:

* torchvision jitters, flips and then crops the full image; we crop+resize first and jitter
  and flip the two small views. The three jitter ops are affine per pixel (brightness
  ``b·x``; contrast ``c·x + (1-c)·m`` with ``m`` the mean grey of the *full* image, which we
  compute before cropping; saturation ``s·x + (1-s)·grey(x)``) and resizing is linear, so the
  order only moves where values get clipped to [0, 255]. The crop box distribution is
  symmetric under a horizontal flip, so flipping after cropping is equivalent.
* torchvision applies the three jitter ops in a random order, clipping to uint8 after each.
  Without clipping they commute exactly (``m`` is unchanged by saturation and scales with
  brightness), so we apply saturation then ``b·(c·x + (1-c)·m)`` once and clip once at the end.

Unreadable files (garbage, truncated, missing) never stop a run. DALI's decoder raises and
invalidates the pipeline on a bad file, so the loader keeps the batches it has handed to DALI;
on an error it finds the culprits among them (PIL, then a one-file DALI decode), adds them to
``bad_files`` (a warning names each once), swaps each for the next readable file, rebuilds the
pipeline and replays those batches. Batch counts per epoch stay the same on every DDP rank.
``scan=True`` additionally checks every file up front with PIL (a JPEG is decoded at 1/8 scale,
which still reads the whole stream, about 1 ms a file), with a progress bar and an optional
JSON cache, so the count is known before training starts.

Shuffling and sharding are exact and done here, not in DALI: epoch ``e`` uses the permutation
drawn from ``(seed, e)``, identical on all ranks; rank ``shard_id`` takes every
``num_shards``-th file of it. DALI's random ops draw from a stream seeded by ``(seed,
shard_id)`` and the epoch and step the pipeline starts at, so runs with the same arguments
(and the same resume point) are identical.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastbeit.data.folder import find_images
from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD, LOGIT_LAPLACE_EPS
from fastbeit.errors import UserError
from fastbeit.masking import MaskingGenerator

DALI_PIP = "pip install nvidia-dali-cuda130"
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What fn.decoders.image reads, as PIL names it (MPO: the multi-picture JPEG some cameras write).
DALI_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP")
MaskFn = Callable[[int, int], torch.Tensor]
# Operators whose failure means a bad file (anything else is re-raised as it is).
DATA_OPERATORS = ("fn.io.file.read", "fn.decoders.image")

__all__ = [
    "DALI_PIP",
    "DaliPretrainLoader",
    "block_mask_fn",
    "check_image",
    "dali_available",
    "sample_dali_crop_boxes",
    "scan_images",
]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (a broken install counts as absent)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _require_dali() -> None:
    if not dali_available():
        raise UserError(f"NVIDIA DALI is not installed; install it with `{DALI_PIP}` or use --loader torch")


# ----------------------------------------------------------------------------- file checks


def check_image(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be decoded (by PIL, or by DALI for its format), or None. A JPEG is
    decoded at 1/8 scale: cheap, but it still reads every entropy-coded byte, so truncation shows."""
    try:
        with Image.open(path) as img:
            if img.format not in DALI_FORMATS:
                return f"DALI does not decode {img.format} images"
            if img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as exc:  # PIL raises many types for bad data; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _file_key(path: str) -> Optional[List[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_scan_cache(cache: Optional[Path]) -> Dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text()).get("entries", {})
    except (OSError, ValueError):
        return {}


def _save_scan_cache(cache: Path, entries: Dict[str, list]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(cache.suffix + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "entries": entries}))
    os.replace(tmp, cache)


def scan_images(
    files: Sequence[str | os.PathLike],
    num_threads: int = 8,
    cache: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> Dict[str, str]:
    """``{path: reason}`` for the files that cannot be decoded. Results are cached per file
    (size, mtime) in ``cache`` so a re-run over a large dataset is instant."""
    from tqdm import tqdm

    cache_path = Path(cache) if cache is not None else None
    entries = _load_scan_cache(cache_path)
    paths = [str(f) for f in files]
    keys = {p: _file_key(p) for p in paths}
    todo = [p for p in paths if keys[p] is None or entries.get(p, [None])[:2] != keys[p]]
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # PIL decodes without the GIL
        results = pool.map(check_image, todo)
        for path, reason in tqdm(zip(todo, results), total=len(todo), desc="checking images",
                                 disable=not progress or not todo):
            entries[path] = [*(keys[path] or [-1, -1]), reason]
    if cache_path is not None and todo:
        _save_scan_cache(cache_path, entries)
    return {p: entries[p][2] for p in paths if entries[p][2] is not None}


def _dali_decodes(path: str, device_id: Optional[int]) -> bool:
    """Whether DALI itself can read and decode ``path`` (the final word on a suspect file)."""
    from nvidia.dali import Pipeline, fn, types

    encoded_path = np.frombuffer(path.encode("utf-8"), dtype=np.uint8)
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    with pipe:
        paths = fn.external_source(source=lambda: [encoded_path], batch=True, dtype=types.UINT8)
        device = "cpu" if device_id is None else "mixed"
        pipe.set_outputs(fn.decoders.image(fn.io.file.read(paths), device=device, output_type=types.RGB))
    try:
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    finally:
        del pipe
    return True


def _find_unreadable(paths: Sequence[str], device_id: Optional[int]) -> Dict[str, str]:
    """The files among ``paths`` that break decoding: PIL first (fast), DALI if PIL finds none."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(4) as pool:
        reasons = dict(zip(unique, pool.map(check_image, unique)))
    bad = {p: r for p, r in reasons.items() if r is not None}
    if bad:
        return bad
    return {p: "DALI cannot decode it" for p in unique if not _dali_decodes(p, device_id)}


# ----------------------------------------------------------------------------- the DALI graph


def _crop_window(shape, scale: Tuple[float, float], ratio: Tuple[float, float]):
    """(anchor, size) of one random-resized-crop box per image, in (y, x) order, as DALI ints."""
    from nvidia.dali import fn

    return fn.random_crop_generator(shape, random_area=list(scale), random_aspect_ratio=list(ratio))


def _jitter_factors(images, strength: float, gpu: bool):
    """Per-image random (brightness, contrast, saturation) and the (gain, offset) that make a
    saturated view ``gain·x + offset`` = brightness·(contrast·x + (1-contrast)·mean_grey), with
    mean_grey taken over the full image as torchvision does."""
    from nvidia.dali import fn, types

    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = [fn.random.uniform(range=[lo, hi]) for _ in range(3)]
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    mean_grey = fn.reductions.mean(fn.cast(grey, dtype=types.FLOAT))
    brightness, contrast = factors[0], factors[1]
    if gpu:  # arithmetic with a GPU operand wants every operand on the GPU
        brightness, contrast = brightness.gpu(), contrast.gpu()
    return factors, brightness * contrast, brightness * (1.0 - contrast) * mean_grey


def _view(images, start, end, size: int, interp, jitter, mirror, mean, std, shift: float, dtype):
    """Resize the crop box to ``size``², jitter, flip, normalize to CHW."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    view = fn.resize(images, size=[size, size], roi_start=start, roi_end=end, roi_relative=False,
                     interp_type=interp, antialias=True)
    if jitter is not None:
        (_, _, saturation), gain, offset = jitter
        view = fn.saturation(view, saturation=saturation, dtype=types.FLOAT)
        view = dmath.clamp(view * gain + offset, 0.0, 255.0)
    return fn.crop_mirror_normalize(view, dtype=dtype, output_layout="CHW", mean=list(mean),
                                    std=list(std), shift=shift, mirror=mirror)


@dataclass(frozen=True)
class _Config:
    batch_size: int
    input_size: int
    second_input_size: int
    color_jitter: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    device_id: Optional[int]
    num_threads: int
    prefetch: int
    half: bool  # DALI emits float16 (else float32); bfloat16 is a cast in torch


def _build_pipeline(cfg: _Config, source: Callable[[], List[np.ndarray]], seed: int, with_params: bool):
    """The DALI pipeline: encoded paths from ``source`` → patches, tokens (+ the random
    parameters: crop anchor and size, flip, jitter factors, when ``with_params``)."""
    from nvidia.dali import Pipeline, fn, types

    gpu = cfg.device_id is not None
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=cfg.device_id,
                    seed=seed, prefetch_queue_depth=cfg.prefetch)
    with pipe:
        paths = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(fn.io.file.read(paths), device="mixed" if gpu else "cpu",
                                   output_type=types.RGB)
        patches, tokens, params = two_views(cfg, images)
        pipe.set_outputs(patches, tokens, *(params if with_params else []))
    pipe.build()
    return pipe


def dali_to_torch(tensor_list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A DALI batch output as one torch tensor on ``device`` in ``dtype`` (copied on the current
    CUDA stream when on the GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = tensor_list.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out if out.dtype == dtype else out.to(dtype)


def two_views(cfg: _Config, images):
    """Decoded images → (patch view, token view, the random parameters): the one augmentation
    graph shared by the folder and the shard pipelines."""
    from nvidia.dali import fn, types

    anchor, size = _crop_window(images.shape(), cfg.scale, cfg.ratio)
    start, end = fn.cast(anchor, dtype=types.FLOAT), fn.cast(anchor + size, dtype=types.FLOAT)
    jitter = _jitter_factors(images, cfg.color_jitter, cfg.device_id is not None) if cfg.color_jitter > 0 else None
    mirror = fn.random.coin_flip(probability=0.5)
    out_type = types.FLOAT16 if cfg.half else types.FLOAT
    patches = _view(images, start, end, cfg.input_size, types.INTERP_CUBIC, jitter, mirror,
                    [255 * m for m in cfg.mean], [255 * s for s in cfg.std], 0.0, out_type)
    token_std = 255 / (1 - 2 * LOGIT_LAPLACE_EPS)
    tokens = _view(images, start, end, cfg.second_input_size, types.INTERP_LANCZOS3, jitter, mirror,
                   [0.0] * 3, [token_std] * 3, LOGIT_LAPLACE_EPS, out_type)
    return patches, tokens, [anchor, size, mirror, *(jitter[0] if jitter is not None else [])]


def sample_dali_crop_boxes(
    height: int,
    width: int,
    n: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    seed: int = 0,
) -> np.ndarray:
    """``n`` crop boxes ``(top, left, h, w)`` from the loader's own box sampler, for checking its
    distribution against :func:`fastbeit.data.transforms.sample_crop_box`."""
    _require_dali()
    from nvidia.dali import Pipeline, fn, types

    shape = np.array([height, width, 3], dtype=np.int64)
    pipe = Pipeline(batch_size=n, num_threads=1, device_id=None, seed=seed, prefetch_queue_depth=1)
    with pipe:
        shapes = fn.external_source(source=lambda: [shape] * n, batch=True, dtype=types.INT64)
        anchor, size = _crop_window(shapes, scale, ratio)
        pipe.set_outputs(anchor, size)
    pipe.build()
    anchor, size = (np.stack([np.asarray(t) for t in out]) for out in pipe.run())
    return np.concatenate([anchor, size], axis=1).astype(np.int64)


def block_mask_fn(generator: MaskingGenerator, seed: int = 0, device: str | torch.device = "cuda") -> MaskFn:
    """A ``masks`` hook drawing a batch of masks with ``generator``'s settings in one launch of
    :func:`fastbeit.kernels.block_mask.sample_block_masks` (its CPU reference where Triton cannot
    run); ``offset`` is the global step, so masks are a function of (seed, step, image). Give each
    DDP rank its own ``seed``."""
    from fastbeit.kernels.block_mask import sample_block_masks

    g = generator
    settings = dict(grid=(g.height, g.width), num_masking_patches=g.num_masking_patches,
                    min_num_patches=g.min_num_patches, max_num_patches=g.max_num_patches,
                    min_aspect=g.min_aspect, max_aspect=g.max_aspect, mode=g.mode)
    return lambda batch_size, step: sample_block_masks(batch_size, seed=seed, offset=step, device=device,
                                                       **settings)


# ----------------------------------------------------------------------------- the loader


@dataclass
class _Batch:
    epoch: int
    step: int
    indices: np.ndarray


class _Feeder:
    """DALI's external source: encoded paths of an endless stream of planned batches. It keeps
    what DALI holds (``inflight``) so a failed pipeline can be rebuilt and those batches replayed."""

    def __init__(self, plan: Iterator[_Batch], replay: Sequence[_Batch], fix: Callable[[np.ndarray], np.ndarray],
                 encoded: List[np.ndarray]) -> None:
        self.plan, self.replay = plan, deque(replay)
        self.fix, self.encoded = fix, encoded
        self.inflight: Deque[_Batch] = deque()

    def peek(self) -> Tuple[int, int]:
        """(epoch, step) of the next batch the pipeline will output."""
        if self.inflight:
            return self.inflight[0].epoch, self.inflight[0].step
        if not self.replay:
            self.replay.append(next(self.plan))
        return self.replay[0].epoch, self.replay[0].step

    def __call__(self) -> List[np.ndarray]:
        batch = self.replay.popleft() if self.replay else next(self.plan)
        batch.indices = self.fix(batch.indices)
        self.inflight.append(batch)
        return [self.encoded[i] for i in batch.indices]


def _check_args(batch_size: int, shard_id: int, num_shards: int, dtype: torch.dtype, device_id) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise UserError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    if device_id is not None and not torch.cuda.is_available():
        raise UserError(f"device_id={device_id} asks for the GPU pipeline but CUDA is not available; "
                        "use device_id=None for the CPU pipeline")


def _resolve_files(root, files) -> List[str]:
    if (root is None) == (files is None):
        raise UserError("give exactly one of `root` (an image folder) or `files` (a list of paths)")
    found = find_images(root) if root is not None else list(files)
    if not found:
        raise UserError("the file list is empty")
    return [str(f) for f in found]


class DaliPretrainLoader:
    """Batches of ``(patches [B,3,S,S], tokens [B,3,s,s])`` (plus ``mask`` when ``masks`` is set).

    Use it like a DataLoader: ``for batch in loader`` runs one epoch of ``len(loader)`` batches
    and moves on to the next epoch; ``set_epoch(e, step)`` jumps (e.g. when resuming). Tensors are on
    ``cuda:device_id`` in GPU mode, on the CPU with ``device_id=None``. ``masks(batch_size,
    step)`` is called once per batch (``step`` counts batches from epoch 0) so no per-image
    Python runs. ``bad_files`` lists every unreadable file met so far. ``with_params`` (for
    tests) appends a dict of each image's crop box ``(top, left, h, w)``, flip and jitter factors.
    """

    def __init__(
        self,
        root: Optional[str | os.PathLike] = None,
        *,
        files: Optional[Sequence[str | os.PathLike]] = None,
        batch_size: int,
        input_size: int = 224,
        second_input_size: int = 112,
        color_jitter: float = 0.4,
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        device_id: Optional[int] = None,
        num_threads: int = 4,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        dtype: torch.dtype = torch.float32,
        masks: Optional[MaskFn] = None,
        prefetch: int = 2,
        scan: bool = False,
        scan_cache: Optional[str | os.PathLike] = None,
        progress: bool = True,
        with_params: bool = False,
    ) -> None:
        _require_dali()
        _check_args(batch_size, shard_id, num_shards, dtype, device_id)
        self.files = _resolve_files(root, files)
        self.cfg = _Config(batch_size, input_size, second_input_size, float(color_jitter),
                           tuple(mean), tuple(std), tuple(scale), tuple(ratio), device_id,
                           max(1, num_threads), max(1, prefetch), dtype == torch.float16)
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.shuffle, self.drop_last, self.dtype, self.masks = shuffle, drop_last, dtype, masks
        self.with_params = with_params
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.bad_files: List[str] = []
        self._bad: set = set()
        self._encoded = [np.frombuffer(f.encode("utf-8"), dtype=np.uint8) for f in self.files]
        self.epoch, self._start_step = 0, 0
        self._pipe = None
        self._feeder: Optional[_Feeder] = None
        if scan:
            self._mark_bad(scan_images(self.files, max(1, num_threads), scan_cache, progress))
        if len(self) == 0:
            raise UserError(f"{self.num_samples} images per shard make no batch of {batch_size} "
                            "(drop_last=True); lower the batch size")

    # -- epoch plan -------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Images this shard reads per epoch (every shard reads the same number)."""
        n, s = len(self.files), self.num_shards
        return n // s if self.drop_last else -(-n // s)

    def __len__(self) -> int:
        b = self.cfg.batch_size
        return self.num_samples // b if self.drop_last else -(-self.num_samples // b)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Make the next ``for`` loop run epoch ``epoch`` from batch ``step`` (resuming). The file
        order depends only on (seed, epoch)."""
        if not 0 <= step < len(self):
            raise UserError(f"step {step} is outside epoch of {len(self)} batches")
        self.epoch, self._start_step = int(epoch), int(step)

    def shard_indices(self, epoch: int) -> np.ndarray:
        """Indices into ``files`` this shard reads in ``epoch``, in order: the epoch's global
        permutation, trimmed (drop_last) or wrapped to a multiple of ``num_shards``, strided."""
        n, total = len(self.files), self.num_samples * self.num_shards
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, total)  # trims, or repeats from the start to pad
        return order[self.shard_id :: self.num_shards]

    def _plan(self, epoch: int) -> Iterator[_Batch]:
        while True:
            idx = self.shard_indices(epoch)
            for step in range(len(self)):
                chunk = idx[step * self.cfg.batch_size : (step + 1) * self.cfg.batch_size]
                yield _Batch(epoch, step, chunk)
            epoch += 1

    # -- bad files ---------------------------------------------------------------------------

    def _mark_bad(self, reasons: Dict[str, str]) -> None:
        index = {f: i for i, f in enumerate(self.files)} if reasons else {}
        for path, reason in sorted(reasons.items()):
            if index[path] not in self._bad:
                self._bad.add(index[path])
                self.bad_files.append(path)
                warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=3)
        if len(self._bad) == len(self.files):
            raise UserError(f"none of the {len(self.files)} images could be decoded")

    def _replace_bad(self, indices: np.ndarray) -> np.ndarray:
        """Swap each known-bad index for the next readable file (as ImageFolderDataset does)."""
        if not self._bad:
            return indices
        out = indices.copy()
        for k, i in enumerate(out):
            while int(i) in self._bad:
                i = (int(i) + 1) % len(self.files)
            out[k] = i
        return out

    # -- the pipeline ------------------------------------------------------------------------

    def _start(self, epoch: int, step: int = 0, replay: Sequence[_Batch] = (),
               plan: Optional[Iterator[_Batch]] = None) -> None:
        """(Re)build the pipeline so its next output is batch ``step`` of ``epoch``."""
        self._pipe = None
        if plan is None:
            plan = self._plan(epoch)
            for _ in range(step):
                next(plan)
        self._feeder = _Feeder(plan, replay, self._replace_bad, self._encoded)
        seed = int(np.random.SeedSequence([self.seed, self.shard_id, epoch, step]).generate_state(1)[0] >> 1)
        self._pipe = _build_pipeline(self.cfg, self._feeder, seed, self.with_params)

    def _recover(self, exc: RuntimeError) -> None:
        """Find the unreadable files among the batches DALI held, drop them, rebuild, replay."""
        if not any(op in str(exc) for op in DATA_OPERATORS):
            raise exc
        feeder = self._feeder
        held = list(feeder.inflight)
        suspects = [self.files[i] for b in held for i in b.indices]
        bad = _find_unreadable(suspects, self.cfg.device_id)
        if not bad:
            raise exc
        self._mark_bad(bad)
        first = held[0] if held else _Batch(*feeder.peek(), np.empty(0, np.int64))
        self._start(first.epoch, first.step, replay=[*held, *feeder.replay], plan=feeder.plan)

    def _run(self) -> Tuple[_Batch, tuple]:
        """One pipeline output and the batch it came from, surviving unreadable files."""
        for _ in range(self.cfg.batch_size * self.cfg.prefetch + 1):
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            try:
                outputs = self._pipe.run(stream)
            except RuntimeError as exc:
                self._recover(exc)
                continue
            return self._feeder.inflight.popleft(), outputs
        raise UserError("too many unreadable images in a row; check the data folder")

    def _params(self, outputs: Sequence) -> Dict[str, torch.Tensor]:
        """The random draws of a batch: box ``(top, left, h, w)``, flip, jitter factors."""
        anchor, size, mirror, *jitter = (np.stack([np.asarray(t) for t in tl]) for tl in outputs)
        params = {"box": torch.from_numpy(np.concatenate([anchor, size], 1).astype(np.int64)),
                  "flip": torch.from_numpy(mirror.reshape(-1) != 0)}
        if jitter:  # brightness, contrast, saturation
            params["jitter"] = torch.from_numpy(np.stack([j.reshape(-1) for j in jitter], 1))
        return params

    def __iter__(self) -> Iterator[tuple]:
        epoch, step = self.epoch, self._start_step
        if self._feeder is None or self._feeder.peek() != (epoch, step):
            self._start(epoch, step)
        self._start_step = 0
        for _ in range(step, len(self)):
            batch, (patches, tokens, *extra) = self._run()
            out = (dali_to_torch(patches, self.device, self.dtype), dali_to_torch(tokens, self.device, self.dtype))
            if self.masks is not None:
                out = (*out, self.masks(len(batch.indices), batch.epoch * len(self) + batch.step))
            if self.with_params:
                out = (*out, self._params(extra))
            yield out
        self.epoch = epoch + 1

    def close(self) -> None:
        """Free the pipeline (threads, pinned and GPU buffers) now rather than at exit."""
        self._pipe, self._feeder = None, None
