"""The tokenizer's forms, timed one at a time for the benchmark report.

``eager-fp32`` is the original (the module in fp32, NCHW, no autocast). ``plain`` is the inference
form with every option off: the same fp32 convolutions, the last layer's argmax taken over row chunks
(PyTorch) instead of the whole ``[B, V, h, w]`` logits. Each row after it switches on one
optimization of :class:`~fastbeit.tokenizer.infer.InferenceTokenizer` alone (compare it with
``plain``), and ``default`` is what ``fastbeit.pretrain`` runs. A form's share of the step is
``t / (step - t_default + t)``: the measured step (which ran the default form) with the default
tokenizer time swapped for this form's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from fastbeit.kernels import use_triton
from fastbeit.tokenizer.dvae import DiscreteVAE
from fastbeit.tokenizer.infer import DEFAULT_PRECISION, InferenceTokenizer, fp32_math

PLAIN = dict(precision="fp32", fold=False, head="torch", channels_last=False)
# name: (what it is, InferenceTokenizer settings; None = the module itself)
FORMS: Dict[str, tuple] = {
    "eager-fp32": ("the original: the module in fp32, NCHW, eager", None),
    "bf16-autocast": ("the module under the step's bf16 autocast (fastbeit before --tokenizer_precision)", "autocast"),
    "plain": ("inference form, nothing on: unfolded, NCHW, fp32, the head in row chunks (no logits)", PLAIN),
    "folded": ("post_gain folded into the convs (fp32)", dict(PLAIN, fold=True)),
    "channels-last": ("channels-last weights and inputs (fp32)", dict(PLAIN, channels_last=True)),
    "fused-head": ("fused ReLU + 1x1 conv + argmax, no logits (fp32)", dict(PLAIN, head="triton")),
    "tf32": ("TF32 convolutions (= fp32 on a CPU)", dict(PLAIN, precision="tf32")),
    "bf16": ("bf16 weights and activations, fp32 logits", dict(PLAIN, precision="bf16")),
    "compile": ("torch.compile of the body (fp32)", dict(PLAIN, compile=True)),
    "default": (f"all of the above at the default precision ({DEFAULT_PRECISION})", dict(precision=DEFAULT_PRECISION)),
}
CPU_SKIPPED = ("compile",)  # compile time dwarfs a tiny CPU run


Encode = Callable[[torch.Tensor], torch.Tensor]


def encoder_for(model: DiscreteVAE, spec: Any, device: torch.device) -> Optional[Encode]:
    """``encode`` of one form (``spec`` from :data:`FORMS`); None when it cannot run here."""
    if spec is None or spec == "autocast":
        dtype = torch.bfloat16 if spec == "autocast" else None

        def run(x: torch.Tensor) -> torch.Tensor:  # fp32: IEEE, not cuDNN's default TF32 convolutions
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with fp32_math("bf16" if dtype is not None else "fp32"):
                    return model.encode(x)
        return run
    if spec.get("head") == "triton" and not use_triton(next(model.parameters())):
        return None
    return InferenceTokenizer(model, **spec).encode


def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(1, warmup)):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_forms(model: DiscreteVAE, images: torch.Tensor, warmup: int = 2, iters: int = 5,
                  step_ms: Optional[float] = None, names: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Per form: median ms per ``encode(images)``, ids equal to ``eager-fp32``'s, share of the step."""
    device = images.device
    model = model.eval().requires_grad_(False)
    names = names or [n for n in FORMS if device.type == "cuda" or n not in CPU_SKIPPED]
    names = ["eager-fp32"] + [n for n in names if n != "eager-fp32"]
    rows: Dict[str, Dict[str, Any]] = {}
    reference = None
    for name in names:
        what, spec = FORMS[name]
        try:
            fn = encoder_for(model, spec, device)
            if fn is None:
                rows[name] = {"variant": what, "skipped": "needs CUDA (or the Triton interpreter)"}
                continue
            ids = fn(images)
            reference = ids if reference is None else reference
            ms = _median_ms(lambda f=fn: f(images), device, warmup, iters)
        except Exception as exc:  # one form failing (e.g. compile) must not lose the others
            rows[name] = {"variant": what, "skipped": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        rows[name] = {"variant": what, "ms": ms, "agree": float((ids == reference).float().mean())}
    default_ms = rows.get("default", {}).get("ms")
    if step_ms and default_ms:
        for row in rows.values():
            if "ms" in row:
                row["share"] = row["ms"] / (step_ms - default_ms + row["ms"])
    return rows


def forms_markdown(forms: Optional[Dict[str, Dict[str, Any]]], batch: int) -> List[str]:
    """The report's table of tokenizer forms (empty when none were measured)."""
    if not forms:
        return []
    base = forms.get("eager-fp32", {}).get("ms")
    body = ["| form | what | ms / batch | vs eager fp32 | share of the step | ids equal to eager fp32 |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in forms.items():
        if "ms" not in r:
            body.append(f"| {name} | {r['variant']} | – | – | – | {r.get('skipped', '')} |")
            continue
        share = f"{100 * r['share']:.1f} %" if "share" in r else "–"
        speed = f"{base / r['ms']:.2f}×" if base else "–"
        body.append(f"| {name} | {r['variant']} | {r['ms']:.2f} | {speed} | {share} | {100 * r['agree']:.2f} % |")
    return ["## The tokenizer's forms", "",
            f"Tokenizer encode alone, batch {batch}. `plain` is the inference form with every option off; each "
            "row after it switches on one optimization alone. Share of the step: this form's time in the measured "
            "fastbeit step in place of the default's. Agreement is on the images timed (random views in the "
            "report); on real photos see benchmarks/results.", "",
            *body, ""]


def report_forms(args: Any, step_row: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """:func:`measure_forms` for ``python -m fastbeit.report``: its tokenizer (width, vocabulary, view
    size), batch, device and seed; ``step_row`` is the measured fastbeit step (for the shares)."""
    from fastbeit import bench_step as bs
    from fastbeit.tokenizer.dvae import DOWNSAMPLE

    device = torch.device(args.device)
    grid = args.img_size // args.patch_size
    cfg = bs.tokenizer_config(grid, args.vocab, bs.resolve_tokenizer_size(args.tokenizer, device))
    torch.manual_seed(args.seed)
    with device:
        model = DiscreteVAE(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    side = grid * DOWNSAMPLE
    view = (0.1 + 0.8 * torch.rand(args.batch, 3, side, side, generator=gen)).to(device)
    step_ms = (step_row or {}).get("step_ms")
    names = [n for n in FORMS if n != "compile"]  # compiling would take most of a GPU session's report stage
    try:
        return measure_forms(model, view, warmup=1, iters=min(args.iters, 5), step_ms=step_ms, names=names)
    finally:
        del model, view
        if device.type == "cuda":
            torch.cuda.empty_cache()
