"""Where the time of a pre-training step goes, before a GPU measures it: a roofline plan.

    python -m fastbeit.report --plan                  # BEiT-Base, batch 256, bf16, DALL-E tokenizer
    python -m fastbeit.report --plan --output runs/plan --measure   # + measured time per part (GPU)

Every op of the real step is counted on fake tensors (:mod:`fastbeit.plan_count`); the
optimizer (grad-norm clip + fused AdamW, fp32) from the parameter count. Two columns: ``eager``
as counted, and ``fused`` (estimate): flash attention, the gathered cross entropy and the masked
embedding as one kernel each (bytes from their shapes), and every other chain of element-wise
ops fused as ``torch.compile`` would (:func:`fuse_chains`). Time of a kernel = max(FLOPs /
(peak · eff), bytes / (bandwidth · eff_mem)); a part's time is the sum over its kernels; launch
gaps are assumed hidden (CUDA graphs). ``--measure`` adds the measured time of each part
(:mod:`fastbeit.plan_measure`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastbeit import bench_step as bs
from fastbeit.config import PRESETS, make_config
from fastbeit.errors import UserError, cli_entry
from fastbeit.plan_count import PARTS, CountedStep, OpRecord, PlanSettings, StepRecorder, count_step

__all__ = ["PARTS", "CountedStep", "OpRecord", "PlanSettings", "StepRecorder", "count_step", "build_plan",
           "fuse_chains", "plan_markdown", "standing_in_the_way", "main"]

@dataclass(frozen=True)
class Device:
    """Datasheet peak rates (dense bf16 tensor-core FLOP/s, HBM bytes/s)."""

    name: str
    bf16_tflops: float
    hbm_tbs: float
    source: str


# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: BF16 tensor core 1,979 TFLOPS *with sparsity*,
# i.e. 989 dense; HBM3 3.35 TB/s), https://www.nvidia.com/en-us/data-center/h100/ .
# NVIDIA H200 Tensor Core GPU datasheet (BF16 1,979 TFLOPS with sparsity, 989 dense; HBM3e
# 4.8 TB/s), https://www.nvidia.com/en-us/data-center/h200/ .
DEVICES = (
    Device("H100 SXM", 989.0, 3.35, "NVIDIA H100 datasheet, nvidia.com/en-us/data-center/h100"),
    Device("H200", 989.0, 4.8, "NVIDIA H200 datasheet, nvidia.com/en-us/data-center/h200"),
)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet rates a kernel reaches: assumptions until a GPU measures them
    (``--eff gemm=0.7,memory=0.9`` replaces any of them)."""

    gemm: float = 0.65  # bf16 GEMMs with M = 50k, K, N = 768-3072: ~640 TFLOP/s (the 600-700 range)
    conv: float = 0.5  # cuDNN bf16 convolutions of 64-2048 channels: implicit GEMM, below plain GEMMs
    attention: float = 0.25  # flash attention, head dim 64, N = 197, with a bias, forward + backward
    memory: float = 0.85  # streaming element-wise kernels (the 80-90% of HBM bandwidth)
    sources: Tuple[str, ...] = (
        "GEMM: assumed 65% of peak, the middle of the 600-700 TFLOP/s bf16 range for GEMMs of these shapes "
        "on H100; fastbeit.flops.measure_matmul_tflops measures the real rate on a GPU",
        "attention: the FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608), figure 'Attention forward "
        "speed, head dim 128 (H100 80GB SXM5)', has FlashAttention-2 at about 310 and Triton at about 320 "
        "TFLOP/s at sequence length 512; 25% (250 TFLOP/s) is assumed for 197 tokens, head dim 64, a bias and "
        "the backward",
        "memory: assumed 85% of HBM bandwidth for streaming element-wise kernels",
        "conv: assumed 50% of peak for cuDNN bf16 convolutions (no published figure used)",
    )

    def compute(self, kind: str) -> float:
        return {"conv": self.conv, "bmm": self.attention, "attention": self.attention}.get(kind, self.gemm)


def parse_efficiency(spec: Optional[str]) -> Efficiency:
    """``"gemm=0.7,memory=0.9"`` → :class:`Efficiency` with those fields replaced."""
    if not spec:
        return Efficiency()
    values = {}
    names = ("gemm", "conv", "attention", "memory")
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if key not in names or not 0 < number <= 1:
            raise UserError(f"--eff: expected NAME=FRACTION with NAME in {', '.join(names)} and 0 < FRACTION <= 1, "
                            f"got {item!r}")
        values[key] = number
    return Efficiency(**values)


# -------------------------------------------------------------------------------------- kernels


@dataclass
class Kernel:
    """One kernel of the estimate: FLOPs, HBM bytes and the kind that sets its efficiency."""

    part: str
    kind: str
    flops: float
    bytes: float
    label: str = ""
    peak_scale: float = 1.0  # of the bf16 tensor-core peak: 0.5 for TF32 matmuls (the tokenizer's default)

    def compute_seconds(self, dev: Device, eff: Efficiency) -> float:
        if not self.flops:
            return 0.0
        return self.flops / (dev.bf16_tflops * self.peak_scale * 1e12 * eff.compute(self.kind))

    def seconds(self, dev: Device, eff: Efficiency) -> float:
        return max(self.compute_seconds(dev, eff), self.bytes / (dev.hbm_tbs * 1e12 * eff.memory))


# Tensor-core peak of each tokenizer precision relative to bf16 dense, from the same datasheets:
# TF32 494.7 TFLOP/s dense (989.4 with sparsity) on both GPUs; fp32 without tensor cores 67 TFLOP/s.
TOKENIZER_PEAK_SCALE = {"bf16": 1.0, "tf32": 0.5, "fp32": 67.0 / 989.0}


def _at_tokenizer_precision(kernels: List[Kernel], precision: str) -> List[Kernel]:
    for k in kernels:
        if k.part == "tokenizer":
            k.peak_scale = TOKENIZER_PEAK_SCALE[precision]
    return kernels


def eager_kernels(step: CountedStep) -> List[Kernel]:
    """One kernel per recorded op (views move nothing and are left out)."""
    return [Kernel(r.part, r.kind, r.flops, r.bytes, r.name) for r in step.records if r.kind != "view"]


# Kinds torch.compile (Inductor) fuses: element-wise ops, and LayerNorm forward/backward (a row
# reduction over D it computes in one persistent-reduction kernel with the element-wise work
# around it). Matmuls, convolutions and attention stay library/Triton kernels of their own.
FUSIBLE = ("other", "norm")


def fuse_chains(records: Sequence[OpRecord], live: set, strict: bool = False) -> List[Kernel]:
    """``torch.compile``'s fusion of element-wise work, as a rule on the recorded op sequence.

    Rule: between two matmuls / convs / attention ops (and within one part and phase), every
    :data:`FUSIBLE` op (element-wise ops and norms; views are free) that reads a tensor written
    by an earlier op of an open chain joins that chain (joining two chains when it reads both);
    any other starts a chain of its own. A chain is one kernel: it reads each outside tensor once
    and writes only the tensors read after the chain (later ops, the backward, or alive after the
    step: gradients, loss). Other ops stay single kernels. ``strict``: norms are not fused and
    only consecutive ops chain (an op joins only the chain of the op just before it).
    """
    fusible = ("other",) if strict else FUSIBLE
    readers: Dict[int, List[int]] = {}
    for i, r in enumerate(records):
        for k, _ in r.reads:
            readers.setdefault(k, []).append(i)
    kernels: List[Kernel] = []
    chains: List[List[int]] = []  # the open chains since the last non-fusible op
    made: List[set] = []  # storage keys each open chain wrote

    def emit(chain: List[int]) -> None:
        chain.sort()
        members = set(chain)
        written: Dict[int, int] = {}
        reads: Dict[int, int] = {}
        for i in chain:
            for k, b in records[i].reads:
                if k not in written:
                    reads[k] = max(reads.get(k, 0), b)
            for k, b in records[i].writes:
                written[k] = max(written.get(k, 0), b)
        needed = sum(b for k, b in written.items()
                     if k in live or any(j not in members and j > chain[0] for j in readers.get(k, [])))
        first = records[chain[0]]
        kernels.append(Kernel(first.part, "other", 0.0, sum(reads.values()) + needed,
                              f"fused chain of {len(chain)} ops from {first.name}"))

    def close_all() -> None:
        for chain in chains:
            emit(chain)
        chains.clear()
        made.clear()

    group = None
    for i, r in enumerate(records):
        if r.kind == "view":
            continue
        if r.kind not in fusible:
            close_all()
            kernels.append(Kernel(r.part, r.kind, r.flops, r.bytes, r.name))
            continue
        if (r.part, r.phase, r.sub) != group:
            close_all()
            group = (r.part, r.phase, r.sub)
        keys = {k for k, _ in r.reads}
        hits = [c for c in range(len(chains)) if made[c] & keys]
        if strict and hits != [len(chains) - 1]:
            close_all()
            hits = []
        for c in reversed(hits[1:]):  # an op reading two open chains joins them
            chains[hits[0]] += chains.pop(c)
            made[hits[0]] |= made.pop(c)
        if not hits:
            chains.append([])
            made.append(set())
        target = hits[0] if hits else -1
        chains[target].append(i)
        made[target] |= {k for k, _ in r.writes}
    close_all()
    return kernels


def _model_dims(step: CountedStep):
    s = step.settings
    cfg = make_config(s.model, img_size=s.img_size, patch_size=s.patch_size, vocab_size=s.vocab, depth=s.depth)
    return cfg, s.batch, cfg.num_patches + 1


def flash_attention_kernels(step: CountedStep) -> List[Kernel]:
    """Flash attention with the relative position bias, per layer, forward and backward.

    Forward reads q, k, v (bf16) and the [H, N, N] float32 bias (shared by the batch: read once,
    L2-resident), writes out (bf16) and the row log-sum-exp (float32); no N x N tensor. Backward
    reads q, k, v, out, d(out), lse and the bias, writes dq, dk, dv and the float32 d(bias); it
    recomputes QKᵀ: 10·N²·d multiply-add FLOPs per head against the forward's 4·N²·d.
    """
    cfg, b, n = _model_dims(step)
    h, d = cfg.num_heads, cfg.head_dim
    act = 2 if step.settings.amp == "bf16" else 4
    bnd = b * n * h * d * act
    bias = h * n * n * 4
    lse = b * h * n * 4
    fwd = Kernel("attention", "attention", 4.0 * b * h * n * n * d, 3 * bnd + bias + bnd + lse, "flash fwd")
    bwd = Kernel("attention", "attention", 10.0 * b * h * n * n * d, 5 * bnd + lse + bias + 3 * bnd + bias,
                 "flash bwd")
    return [fwd, bwd] * cfg.depth


def gathered_ce_kernels(step: CountedStep) -> List[Kernel]:
    """The lm_head + cross entropy on the M masked rows without [M, V] logits.

    Forward: reads the M hidden rows (float32: the final norm's output) and W (once: L2-resident
    tiles), writes three float32 numbers per row. Backward: recomputes the logits per row chunk
    and writes d(logits) in bf16 (a bounded scratch, counted as HBM traffic: written once, read
    by the d(hidden) and d(W) matmuls), writes d(hidden) into a zeroed [B, N, D] float32 tensor
    and the float32 d(W), d(b).
    """
    cfg, b, n = _model_dims(step)
    m, dim, v = step.masked_total, cfg.embed_dim, cfg.vocab_size
    w, rows = v * dim * 4, m * dim * 4
    ds = m * v * 2
    return [
        Kernel("loss", "matmul", 2.0 * m * dim * v, rows + w + 12 * m, "gathered CE fwd"),
        Kernel("loss", "matmul", 2.0 * m * dim * v, rows + w + 4 * m + ds, "CE d(logits)"),
        Kernel("loss", "memory", 0.0, b * (n - 1) * dim * 4, "zero d(hidden)"),
        Kernel("loss", "matmul", 2.0 * m * dim * v, ds + w + rows, "CE d(hidden)"),
        Kernel("loss", "matmul", 2.0 * m * dim * v, ds + rows + w + 4 * v, "CE d(W), d(b)"),
    ]


def masked_embed_kernels(step: CountedStep) -> List[Kernel]:
    """Mask-token blend, CLS and positions in one pass each way: reads the bf16 patch tokens and
    the mask, writes the float32 [B, N+1, D] stream (the blend promotes to the mask token's dtype);
    backward reads that gradient and writes the bf16 patch gradient (+ tiny parameter sums)."""
    cfg, b, n = _model_dims(step)
    act = 2 if step.settings.amp == "bf16" else 4
    patches, stream, mask = b * (n - 1) * cfg.embed_dim * act, b * n * cfg.embed_dim * 4, b * (n - 1)
    return [Kernel("patch embed", "other", 0.0, patches + mask + stream, "masked embed fwd"),
            Kernel("patch embed", "other", 0.0, stream + mask + patches, "masked embed bwd")]


def optimizer_kernels(step: CountedStep) -> List[Kernel]:
    """Grad-norm clip (foreach: read every grad for the norm, read + write to scale) and fused AdamW
    (read param, grad, m, v; write param, m, v), all float32: 40 bytes per parameter."""
    p = step.num_params
    return [Kernel("optimizer", "other", 0.0, 12.0 * p, "clip_grad_norm_"),
            Kernel("optimizer", "other", 0.0, 28.0 * p, "fused AdamW")]


def fused_kernels(step: CountedStep, strict: bool = False) -> List[Kernel]:
    """The compiled step: chain fusion everywhere, then the fused kernels' analytic parts."""
    replaced = lambda r: r.part in ("attention", "loss") or r.sub == "masked embed"
    kept = [r for r in step.records if not replaced(r)]
    return (fuse_chains(kept, step.live, strict) + masked_embed_kernels(step) + flash_attention_kernels(step)
            + gathered_ce_kernels(step) + optimizer_kernels(step))


# ------------------------------------------------------------------------------------- the plan


def _by_part(kernels: Sequence[Kernel], dev: Device, eff: Efficiency) -> Dict[str, Dict[str, float]]:
    out = {p: {"flops": 0.0, "bytes": 0.0, "ms": 0.0, "compute_ms": 0.0} for p in PARTS}
    for k in kernels:
        row = out[k.part]
        row["flops"] += k.flops
        row["bytes"] += k.bytes
        sec = k.seconds(dev, eff)
        row["ms"] += 1e3 * sec
        if k.flops and k.compute_seconds(dev, eff) >= sec:
            row["compute_ms"] += 1e3 * sec
    return out


def build_plan(step: CountedStep, eff: Efficiency = Efficiency(), devices: Sequence[Device] = DEVICES,
               measured: Optional[Dict[str, float]] = None, measured_label: str = "") -> Dict[str, Any]:
    """The plan as a JSON-able dict: per device and part, FLOPs, bytes and time, eager and fused."""
    precision = step.settings.tokenizer_precision
    eager = _at_tokenizer_precision(eager_kernels(step) + optimizer_kernels(step), precision)
    fused = _at_tokenizer_precision(fused_kernels(step), precision)
    strict = _at_tokenizer_precision(fused_kernels(step, strict=True), precision)
    b = step.settings.batch
    counted_per_image = sum(r.flops for r in step.records) / b
    plan: Dict[str, Any] = {
        "kind": "plan",
        "settings": asdict(step.settings),
        "parameters": step.num_params,
        "masked_per_image": step.masked_total / b,
        "host_syncs": step.host_syncs,
        "count_seconds": step.seconds,
        "ops_recorded": len(step.records),
        "flops_per_image": {"counted": counted_per_image, "fastbeit.flops": step.flops_per_image_analytic},
        "efficiency": asdict(eff),
        "devices": {},
    }
    for dev in devices:
        e, f = _by_part(eager, dev, eff), _by_part(fused, dev, eff)
        parts = {p: {"gflop": e[p]["flops"] / 1e9, "eager_gb": e[p]["bytes"] / 1e9, "fused_gb": f[p]["bytes"] / 1e9,
                     "fused_gflop": f[p]["flops"] / 1e9, "eager_ms": e[p]["ms"], "fused_ms": f[p]["ms"],
                     "fused_bound": "compute" if f[p]["compute_ms"] > f[p]["ms"] / 2 else "memory"} for p in PARTS}
        if measured:
            for p in PARTS:
                parts[p]["measured_ms"] = measured.get(p)
        eager_ms, fused_ms = sum(v["eager_ms"] for v in parts.values()), sum(v["fused_ms"] for v in parts.values())
        strict_ms = sum(v["ms"] for v in _by_part(strict, dev, eff).values())
        plan["devices"][dev.name] = {
            "peak_bf16_tflops": dev.bf16_tflops, "hbm_tbs": dev.hbm_tbs, "source": dev.source, "parts": parts,
            "eager_ms": eager_ms, "fused_ms": fused_ms, "fused_strict_ms": strict_ms,
            "eager_img_per_s": 1e3 * b / eager_ms, "fused_img_per_s": 1e3 * b / fused_ms,
            "fused_strict_img_per_s": 1e3 * b / strict_ms,
        }
    if measured:
        plan["measured"] = {"label": measured_label, "ms": measured}
    return plan


def standing_in_the_way(plan: Dict[str, Any], device: str = "H100 SXM", target: float = 3000.0) -> Optional[str]:
    """A sentence naming the largest parts when the fused estimate misses ``target`` img/s."""
    dev = plan["devices"][device]
    if dev["fused_img_per_s"] >= target:
        return None
    parts = sorted(dev["parts"].items(), key=lambda kv: -kv[1]["fused_ms"])
    top = ", ".join(f"{p} {v['fused_ms']:.1f} ms ({v['fused_bound']}-bound)" for p, v in parts[:3])
    budget = 1e3 * plan["settings"]["batch"] / target
    return (f"{device}: the fused estimate is {dev['fused_img_per_s']:,.0f} img/s, below {target:,.0f} "
            f"(a {budget:.1f} ms step); the largest parts are {top}.")


def plan_markdown(plan: Dict[str, Any]) -> str:
    """The plan's tables (one per device) and its assumptions, in Markdown."""
    s = plan["settings"]
    lines = [
        "# Performance plan (estimate, not a measurement)", "",
        f"{s['model']}, batch {s['batch']}, {s['img_size']} px, {s['amp']}, tokenizer {s['tokenizer']} "
        f"at {s['tokenizer_precision']} "
        f"(vocab {s['vocab']}), {plan['masked_per_image']:.1f} masked patches per image; counted from "
        f"{plan['ops_recorded']} ops of the real step (attention {s['attn']}, reference kernels) on fake tensors.", "",
    ]
    measured = plan.get("measured")
    for name, dev in plan["devices"].items():
        lines += [f"## {name} (bf16 {dev['peak_bf16_tflops']:.0f} TFLOP/s dense, HBM {dev['hbm_tbs']} TB/s)", ""]
        head = "| part | GFLOP | eager GB | eager ms | fused GB | fused ms | fused bound |"
        sep = "|---|--:|--:|--:|--:|--:|---|"
        if measured:
            head += f" measured ms ({measured['label']}) |"
            sep += "--:|"
        lines += [head, sep]
        for part, v in dev["parts"].items():
            row = (f"| {part} | {v['gflop']:,.0f} | {v['eager_gb']:.2f} | {v['eager_ms']:.2f} | {v['fused_gb']:.2f} "
                   f"| {v['fused_ms']:.2f} | {v['fused_bound']} |")
            if measured:
                m = v.get("measured_ms")
                row += f" {m:.2f} |" if m is not None else " - |"
            lines.append(row)
        gflop = sum(v["gflop"] for v in dev["parts"].values())
        lines += [f"| **step** | {gflop:,.0f} | {sum(v['eager_gb'] for v in dev['parts'].values()):.1f} | "
                  f"{dev['eager_ms']:.1f} | {sum(v['fused_gb'] for v in dev['parts'].values()):.1f} | "
                  f"{dev['fused_ms']:.1f} | |", "",
                  f"Roofline: eager {dev['eager_img_per_s']:,.0f} img/s, fused/compiled {dev['fused_img_per_s']:,.0f} "
                  f"img/s ({dev['fused_strict_img_per_s']:,.0f} with the strict chain rule: norms not fused, "
                  "only consecutive ops chained).", ""]
    note = standing_in_the_way(plan)
    eff = plan["efficiency"]
    fl = plan["flops_per_image"]
    lines += [
        "## Assumptions", "",
        f"- Efficiencies: GEMM {eff['gemm']:.0%} of peak, convolutions {eff['conv']:.0%}, attention "
        f"{eff['attention']:.0%}, memory-bound kernels {eff['memory']:.0%} of HBM bandwidth. Sources: "
        + "; ".join(eff["sources"]) + ".",
        "- Time of a kernel = max(FLOPs / (peak × eff), bytes / (bandwidth × eff_mem)); a part is the sum of "
        "its kernels; launch gaps hidden (CUDA graphs); no overlap between kernels.",
        "- FLOPs are matmul/conv/attention multiply-adds × 2 (as torch.utils.flop_counter); element-wise FLOPs "
        f"are not counted. Counted {fl['counted'] / 1e9:.1f} GFLOP per image; fastbeit.flops says "
        f"{fl['fastbeit.flops'] / 1e9:.1f}. The fused attention adds the backward's recomputed QKᵀ.",
        "- Bytes: every tensor an op reads or writes crosses HBM once (no L2 reuse between kernels); a broadcast "
        "tensor counts once.",
        "- Fused column: flash attention with the bias (no N×N tensor, no layout copies), the gathered cross "
        "entropy (no [M, V] logits; its bounded d(logits) scratch counted), the masked embedding in one pass, "
        "and torch.compile fusion by one rule: between two matmuls, convolutions or attention ops, an "
        "element-wise op or LayerNorm that reads a tensor written by an open chain joins it, and a chain is one "
        "kernel reading each outside tensor once and writing only what is read later; the tokenizer's "
        "ReLU/residual chains are fused too (it is assumed compiled).",
        "- Optimizer: grad-norm clip + fused AdamW over all parameters in float32, 40 bytes per parameter "
        f"({plan['parameters'] / 1e6:.1f} M parameters).",
    ]
    if plan["host_syncs"]:
        syncs = ", ".join(f"{k} × {v}" for k, v in plan["host_syncs"].items())
        lines.append(f"- Host syncs seen in the counted step (sizes taken from the real masks): {syncs}.")
    if note:
        lines += ["", f"**What stands in the way of 3,000 img/s:** {note}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI


def plan_table(plan: Dict[str, Any]) -> str:
    """The per-device tables for the terminal (the Markdown, without the headings' hashes)."""
    return plan_markdown(plan).replace("## ", "").replace("# ", "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.report --plan",
                                description="Roofline plan of the pre-training step (estimate, not a measurement).")
    p.add_argument("--model", default="beit_base", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokenizer", choices=("dalle", "tiny"), default="dalle")
    p.add_argument("--amp", choices=sorted(bs.AMP_DTYPES), default="bf16")
    p.add_argument("--tokenizer-precision", choices=tuple(TOKENIZER_PEAK_SCALE), default="tf32",
                   help="the tokenizer's precision (pre-training's default: tf32; bf16 is the fastest, 98.6%% of ids "
                   "equal to fp32's)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                   help="attention of the counted step (sdpa counts PyTorch's CPU math fallback)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eff", default=None,
                   help="replace assumed efficiencies, e.g. gemm=0.7,memory=0.9 (names: gemm, conv, attention, memory)")
    p.add_argument("--measure", action="store_true",
                   help="also run the real step on --device and print the measured time of each part")
    p.add_argument("--device", default=None, help="for --measure: cuda (default when available) or cpu")
    p.add_argument("--steps", type=int, default=3, help="profiled steps for --measure")
    p.add_argument("--output", default=None, help="folder for plan.json and plan.md")
    return p


def parse_settings(argv: Optional[Sequence[str]] = None) -> Tuple[PlanSettings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    for key in ("batch", "img_size", "patch_size", "vocab", "steps"):
        if getattr(args, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive")
    if args.depth is not None and args.depth <= 0:
        raise UserError("--depth must be positive")
    if args.img_size % args.patch_size:
        raise UserError(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    settings = PlanSettings(args.model, args.batch, args.img_size, args.patch_size, args.depth, args.vocab,
                            args.tokenizer, args.amp, args.attn, args.seed, args.tokenizer_precision)
    return settings, args


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    settings, args = parse_settings(argv)
    eff = parse_efficiency(args.eff)
    measured, label = None, ""
    if args.measure:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--measure --device cuda requested but no CUDA device is available")
        from fastbeit.plan_measure import measure_parts

        measured, label = measure_parts(settings, device, args.steps)
        label = f"{bs.device_name(torch.device(device))}, {label}"
        if device.startswith("cuda") and "gemm=" not in (args.eff or ""):  # the measured rate replaces the assumed
            from fastbeit.flops import measure_matmul_tflops

            tflops = measure_matmul_tflops(device, torch.bfloat16)
            eff = replace(eff, gemm=min(1.0, tflops / DEVICES[0].bf16_tflops))
            print(f"measured bf16 matmul rate {tflops:.0f} TFLOP/s: GEMM efficiency {eff.gemm:.0%}", file=sys.stderr)
    plan = build_plan(count_step(settings), eff, measured=measured, measured_label=label)
    print(plan_table(plan))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(plan, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "plan.md").write_text(plan_markdown(plan), encoding="utf-8")
        print(f"wrote {out / 'plan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

