"""How often the tokenizer's ids at each precision equal its fp32 ids, on real photos (CPU).

    python benchmarks/tokenizer_precision.py                       # shipped tokenizer, sample + Imagenette val
    python benchmarks/tokenizer_precision.py --images 1000 --out benchmarks/results/x.md

Photos go through the tokenizer view's preprocessing without the random crop: shorter side to
112 px (Lanczos), centre crop, ``map_pixels``. Variants (the reference is the unfolded module in
IEEE fp32):

* ``fp32 folded``: the inference form (``post_gain`` folded, the head's PyTorch reference), fp32,
  NCHW (its CPU default) and channels-last (its CUDA default; on a CPU another conv algorithm);
* ``tf32 (emulated)``: every conv / matmul operand rounded to TF32's 10-bit mantissa
  (round-to-nearest-even), products summed in fp32: what CUDA's TF32 tensor cores compute. A CPU
  cannot run TF32, so this is an emulation (cuDNN may sum in another order; that matters far less).
  Some kernels feed fp32 bits to the tensor cores, which then ignore the low 13 (truncation): the
  truncating row bounds that case;
* ``bf16 operands, fp32 accumulate``: operands rounded to bf16, everything else fp32;
* ``bf16`` (``--tokenizer_precision bf16``): bf16 weights and activations, fp32 logits (fused head);
* ``bf16 autocast``: the module under the step's bf16 autocast (fastbeit before the option):
  bf16 activations and bf16-rounded logits.

Also times one batch on this CPU (median of a few runs) for the forms that run here.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.overrides import TorchFunctionMode

from fastbeit.data.transforms import map_pixels
from fastbeit.tokenizer.dvae import DiscreteVAE, load_tokenizer
from fastbeit.tokenizer.infer import InferenceTokenizer, module_ids

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "fastbeit" / "assets" / "sample"
IMAGENETTE_VAL = ROOT.parent / "shared" / "data" / "imagenette" / "val"
EXTENSIONS = {".jpg", ".jpeg", ".png"}


def round_mantissa(x: torch.Tensor, bits: int, truncate: bool = False) -> torch.Tensor:
    """fp32 → a value with ``bits`` explicit mantissa bits, still fp32: the nearest (ties to even),
    or with the low bits dropped (``truncate``, towards zero)."""
    drop = 23 - bits
    mag = x.float().abs().view(torch.int32)  # sign dropped: no overflow below
    if not truncate:
        mag = mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)
    return (mag & ~((1 << drop) - 1)).view(torch.float32).copysign(x)


class RoundedOperands(TorchFunctionMode):
    """Rounds the input and weight of every conv2d / linear to ``bits`` mantissa bits."""

    def __init__(self, bits: int, truncate: bool = False) -> None:
        super().__init__()
        self.bits, self.truncate = bits, truncate

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear) and len(args) >= 2:
            args = (*(round_mantissa(a, self.bits, self.truncate) for a in args[:2]), *args[2:])
        return func(*args, **kwargs)


def photo_paths(limit: int, imagenette: Path) -> List[Path]:
    """The shipped sample photos, then Imagenette val photos (when present) up to ``limit``."""
    paths = sorted(p for p in SAMPLE.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if imagenette.is_dir():
        more = sorted(p for p in imagenette.rglob("*") if p.suffix.lower() in EXTENSIONS)
        step = max(1, len(more) // max(1, limit - len(paths)))
        paths += more[::step]  # spread over the classes
    return paths[:limit]


def load_views(paths: List[Path], size: int) -> torch.Tensor:
    views = []
    for p in paths:
        with Image.open(p) as img:
            img = TF.center_crop(TF.resize(img.convert("RGB"), size, TF.InterpolationMode.LANCZOS), size)
            views.append(map_pixels(TF.to_tensor(img)))
    return torch.stack(views)


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def variants(model: DiscreteVAE) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    fp32 = InferenceTokenizer(model, "fp32")
    bf16 = InferenceTokenizer(model, "bf16")

    def rounded(bits: int, truncate: bool = False):
        def run(x):
            with RoundedOperands(bits, truncate):
                return fp32.encode(x)
        return run

    def autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode(x)

    return {"fp32 folded (`fp32`)": fp32.encode,
            "fp32 folded, channels-last (CUDA's layout)": InferenceTokenizer(model, "fp32", channels_last=True).encode,
            "tf32 (emulated, rounding; `tf32` on CUDA)": rounded(10),
            "tf32 (emulated, truncating: a pessimistic bound)": rounded(10, truncate=True),
            "bf16 operands, fp32 accumulate": rounded(7), "bf16 (`bf16`: bf16 activations, fp32 logits)": bf16.encode,
            "bf16 autocast (fastbeit before the option)": autocast}


def median_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=None, help="default: the shipped one")
    p.add_argument("--images", type=int, default=1000, help="photos to tokenize (sample first, then Imagenette val)")
    p.add_argument("--imagenette", type=Path, default=IMAGENETTE_VAL, help="Imagenette val folder")
    p.add_argument("--time-batch", type=int, default=32, help="batch for the CPU timings (0: skip)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    model = load_tokenizer(args.tokenizer)
    paths = photo_paths(args.images, args.imagenette)
    x = load_views(paths, model.config.image_size)
    ref = module_ids(model, x)
    cfg = model.config
    lines = [f"# Tokenizer ids vs fp32 ids ({datetime.date.today()})", "",
             f"Tokenizer: {args.tokenizer or 'shipped (fastbeit/assets/tokenizer.safetensors)'}, DALL-E architecture, "
             f"n_hid {cfg.n_hid}, {cfg.n_blk_per_group} block(s) per group, vocab {cfg.vocab_size}. "
             f"{len(paths)} photos ({sum(1 for q in paths if SAMPLE in q.parents)} shipped samples, the rest "
             f"Imagenette val), {cfg.image_size} px: {ref.numel()} ids. Reference: the unfolded module, IEEE fp32. "
             f"CPU: torch {torch.__version__}, {torch.get_num_threads()} thread(s).", "",
             "| variant | ids equal to fp32 | images with every id equal |", "| --- | --- | --- |"]
    for name, fn in variants(model).items():
        ids = batched(fn, x)
        same = ids == ref
        lines.append(f"| {name} | {100 * same.float().mean():.2f} % | "
                     f"{100 * same.flatten(1).all(1).float().mean():.1f} % |")
        print(lines[-1], file=sys.stderr, flush=True)
    if args.time_batch:
        xb = x[: args.time_batch]
        forms = {"eager fp32 (the unfolded module, NCHW)": model.encode,
                 "folded fp32 (`fp32`, NCHW)": InferenceTokenizer(model, "fp32").encode,
                 "folded fp32, channels-last": InferenceTokenizer(model, "fp32", channels_last=True).encode,
                 "folded bf16 (`bf16`)": InferenceTokenizer(model, "bf16").encode}
        lines += ["", f"CPU time per batch of {xb.shape[0]} (median of 5):", "", "| form | ms |", "| --- | --- |"]
        lines += [f"| {name} | {median_ms(fn, xb):.1f} |" for name, fn in forms.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
