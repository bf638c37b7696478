"""The benchmark report: whole-step throughput of fastbeit against the reference code and timm.

    python -m fastbeit.report                          # CUDA: BEiT-Base B=128 bf16; CPU: a tiny sanity run
    python -m fastbeit.report --batch 256 --output runs/report-b256
    python -m fastbeit.report --ablate                 # the step's optimizations one at a time
    python -m fastbeit.report --from-json bench.json   # a `pytest benchmarks/ --benchmark-json` file
    python -m fastbeit.report --plan                   # roofline estimate per part, H100/H200 (CPU is enough)

Writes ``report.md``, ``results.json`` (rewritten after every measured contender, so a run cut
short still leaves its figures) and PNG bar charts to ``--output``. Every ratio in a report is
between contenders measured in the same run, and MFU is against the matmul rate measured in the
same run. MFU is given twice: against the device's datasheet peak (the usual definition) and
against the matmul rate measured in the same run. A CPU run checks that the harness works; its
numbers say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastbeit import bench_step as bs
from fastbeit.config import PRESETS, make_config
from fastbeit.errors import UserError, cli_entry
from fastbeit.flops import StepFlops, encoder_forward_breakdown, measure_matmul_tflops, mfu, step_flops
from fastbeit.tokenizer.forms import forms_markdown, report_forms
from fastbeit.validate import check_output_dir, resolve_device

GPU_DEFAULTS: Dict[str, Any] = dict(
    model="beit_base", batch=128, img_size=224, patch_size=16, amp="bf16", vocab=8192, warmup=5, iters=15,
    # Most valuable first (a stage cut at its time limit keeps the rows measured so far): ours, the
    # strongest baseline (timm + SDPA + torch.compile), ours compiled, then the eager baselines.
    contenders="fastbeit,timm-compile,fastbeit-compile,timm,reference", profile_steps=3,
)
CPU_DEFAULTS: Dict[str, Any] = dict(
    model="beit_tiny", depth=4, batch=4, img_size=32, patch_size=4, amp="none", vocab=1024, warmup=1, iters=2,
    contenders="fastbeit,reference,timm", profile_steps=1,
)
# key: (what the row changes against fastbeit with everything on, the StepOptions fields it sets)
ABLATIONS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "base": ("fastbeit defaults (faithful masks, no compile)", {}),
    "tokenizer-fp32": ("tokenizer: the original's eager fp32 module, not the inference form",
                       dict(tokenizer_fast=False)),
    "plain-adamw": ("plain AdamW (foreach), not fused", dict(fused_adamw=False)),
    "attn-triton": ("attention: triton", dict(attn_backend="triton")),
    "attn-sdpa": ("attention: sdpa", dict(attn_backend="sdpa")),
    "attn-eager": ("attention: eager", dict(attn_backend="eager")),
    "kernels-triton": ("embed + loss kernels: triton", dict(kernels="triton")),
    "kernels-reference": ("embed + loss kernels: reference (PyTorch)", dict(kernels="reference")),
    "exact-masks": ("exact-count masks (static shapes)", dict(exact_masks=True)),
    "host-sync": ("host sync every step (loss.item(), as the original loop)", dict(host_sync=True)),
    "compile": ("torch.compile", dict(compile=True)),
    "compile-exact": ("torch.compile + exact-count masks", dict(compile=True, exact_masks=True)),
    "cuda-graphs": ("CUDA graphs (torch.compile reduce-overhead) + exact-count masks",
                    dict(compile=True, compile_mode="reduce-overhead", exact_masks=True)),
}
# Compile time dwarfs a tiny CPU run (and CUDA graphs need CUDA): name them to force them.
CPU_SKIPPED_ABLATIONS = ("compile", "compile-exact", "cuda-graphs")
GIB = 2**30
# Dense (no sparsity) 16-bit tensor-core peaks in TFLOP/s, from NVIDIA's datasheets: H100 SXM5
# "BF16 Tensor Core 1,979 TFLOPS (with sparsity)" and the H100 architecture whitepaper's 989.4 dense
# (nvidia.com/en-us/data-center/h100/); the H200 SXM datasheet gives the same 1,979 with sparsity
# (nvidia.com/en-us/data-center/h200/); A100: 312 dense (nvidia.com/en-us/data-center/a100/).
# PCIe and NVL parts run at lower clocks: not listed, so their MFU against a peak reads n/a.
DATASHEET_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastbeit.report",
        description="Whole pre-training step benchmark report (fastbeit vs the reference code vs timm).",
    )
    p.add_argument("--contenders", default=None,
                   help=f"comma list from {', '.join(bs.CONTENDERS)} (any may end in -compile); "
                   f"default: {GPU_DEFAULTS['contenders']} on CUDA, {CPU_DEFAULTS['contenders']} on CPU")
    p.add_argument("--model", default=None, choices=sorted(PRESETS), help="default: beit_base (CUDA), beit_tiny (CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (CUDA), 4 (CPU)")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 (CUDA), 32 (CPU)")
    p.add_argument("--patch-size", type=int, default=None, help="default: 16 (CUDA), 4 (CPU)")
    p.add_argument("--depth", type=int, default=None,
                   help="override the preset's depth; default: the preset's (CUDA), 4 (CPU)")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary; default 8192 (CUDA), 1024 (CPU)")
    p.add_argument("--tokenizer", choices=("auto", "dalle", "tiny"), default="auto",
                   help="tokenizer width: auto = DALL-E's on CUDA, tiny on CPU")
    p.add_argument("--amp", choices=sorted(bs.AMP_DTYPES), default=None, help="default: bf16 (CUDA), none (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per contender")
    p.add_argument("--iters", type=int, default=None, help="timed steps per contender")
    p.add_argument("--profile-steps", type=int, default=None, help="steps in the profiler breakdown")
    p.add_argument("--no-profile", action="store_true", help="skip the per-component breakdown")
    p.add_argument("--ablate", action="store_true", help="measure the step's optimizations one at a time")
    p.add_argument("--ablations", default=None, help=f"comma list of ablation rows from {', '.join(ABLATIONS)}")
    p.add_argument("--from-json", default=None, help="report on a pytest-benchmark JSON file instead of measuring")
    p.add_argument("--plan", action="store_true",
                   help="roofline plan of the step instead (see python -m fastbeit.report --plan --help)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/report", help="folder for report.md, results.json and the charts")
    return p


def resolve_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, fill device-dependent defaults, and validate."""
    args = build_parser().parse_args(argv)
    args.command = "python -m fastbeit.report" + (" " + shlex.join(argv) if argv else "")
    check_output_dir(args.output)
    if args.from_json is not None:
        return args
    args.device = resolve_device(args.device)
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "img_size", "patch_size", "vocab", "iters"):
        if getattr(args, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive")
    if args.depth is not None and args.depth <= 0:
        raise UserError("--depth must be positive")
    if args.warmup < 0 or args.profile_steps <= 0:
        raise UserError("--warmup must be >= 0 and --profile-steps positive")
    if args.img_size % args.patch_size:
        raise UserError(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    args.contender_list = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for name in args.contender_list:
        bs.parse_contender(name)
    if not args.contender_list:
        raise UserError("--contenders is empty")
    args.ablation_list = ablation_keys(args.ablations, args.device)
    return args


def ablation_keys(spec: Optional[str], device: str) -> List[str]:
    """The ablation rows to run: all (minus compile on CPU) or the named ones, ``base`` first."""
    if spec is None:
        keys = [k for k in ABLATIONS if device.startswith("cuda") or k not in CPU_SKIPPED_ABLATIONS]
    else:
        keys = [k.strip() for k in spec.split(",") if k.strip()]
        unknown = [k for k in keys if k not in ABLATIONS]
        if unknown:
            raise UserError(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}")
    return ["base"] + [k for k in keys if k != "base"]


def environment(command: str, device: str) -> Dict[str, Any]:
    """Where and with what the figures were taken."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    try:
        import timm

        timm_version = timm.__version__
    except Exception:
        timm_version = "not installed"
    return {
        "device": bs.device_name(torch.device(device)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "timm": timm_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "command": command,
        "attention_tiles": _attention_tiles(),
    }


def _attention_tiles() -> Any:
    """The attention kernels' tiles every launch used (pinned), or "autotuned": the accumulation
    order that results measured here depend on."""
    try:
        from fastbeit.kernels.attention import autotuning, pinned_tiles
    except Exception:
        return "unavailable"
    return "autotuned (FASTBEIT_AUTOTUNE=1)" if autotuning() else pinned_tiles()


# ----------------------------------------------------------------------------------- measuring


def _builder(args: argparse.Namespace, name: str, options: Optional[bs.StepOptions] = None):
    return functools.partial(
        bs.build_contender, name, args.model, args.batch, args.img_size, args.patch_size, args.amp, args.device,
        options=options, vocab_size=args.vocab, tokenizer_size=args.tokenizer, seed=args.seed, depth=args.depth,
    )


def _flops(args: argparse.Namespace) -> StepFlops:
    cfg = make_config(args.model, img_size=args.img_size, patch_size=args.patch_size, vocab_size=args.vocab,
                      depth=args.depth)
    grid = cfg.grid[0]
    masked = float(bs.make_masks(args.batch, grid, seed=args.seed).sum()) / args.batch
    tok = bs.tokenizer_config(grid, args.vocab, bs.resolve_tokenizer_size(args.tokenizer, torch.device(args.device)))
    return step_flops(cfg, tok, masked)


def _matmul_dtype(args: argparse.Namespace) -> torch.dtype:
    return bs.AMP_DTYPES[args.amp] or torch.float32


def datasheet_peak(device: str, amp: Optional[str]) -> Optional[float]:
    """The datasheet's dense bf16 peak (TFLOP/s) of an SXM H100 / H200 or an A100; None otherwise."""
    if amp != "bf16" or "PCIe" in device or "NVL" in device:
        return None
    return next((v for k, v in DATASHEET_PEAK_TFLOPS.items() if k in device), None)


def add_mfu(row: Dict[str, Any], flops_per_image: float, matmul_tflops: Optional[float]) -> None:
    """``mfu`` (against the measured matmul rate) and ``mfu_peak`` (against the datasheet peak)."""
    peak = datasheet_peak(str(row.get("device", "")), row.get("amp"))
    row["peak_tflops"] = peak
    row["mfu_peak"] = mfu(row["img_per_s"], flops_per_image, peak) if peak else None
    if matmul_tflops:
        row["mfu"] = mfu(row["img_per_s"], flops_per_image, matmul_tflops)


def measure_all(args: argparse.Namespace, out: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    """The comparison (or, with ``--ablate``, the ablation) measured on this machine.

    Fills ``results`` in place, so a caller interrupted half-way still holds every finished row.
    """
    results.update({
        "kind": "ablation" if args.ablate else "comparison",
        "env": environment(args.command, args.device),
        "settings": {k: getattr(args, k) for k in ("model", "batch", "img_size", "patch_size", "depth", "amp",
                                                     "vocab", "tokenizer", "warmup", "iters", "seed")},
    })
    flops = _flops(args)
    results["flops"] = flops.as_dict()
    results["encoder_breakdown"] = encoder_forward_breakdown(
        make_config(args.model, img_size=args.img_size, patch_size=args.patch_size, depth=args.depth))
    dtype = _matmul_dtype(args)
    results["matmul"] = {"dtype": str(dtype).replace("torch.", ""), "tflops": measure_matmul_tflops(args.device, dtype)}
    results["rows"] = {}

    def save(name: str, row: Dict[str, Any]) -> None:
        if "img_per_s" in row:
            add_mfu(row, flops.training, results["matmul"]["tflops"])
        results["rows"][name] = row
        write_json(out / "results.json", results)
        peak = row.get("mfu_peak")
        peak = "no datasheet peak here" if peak is None else f"{_pct(peak)} of the datasheet peak"
        print(f"{name}: " + (row.get("skipped") or f"{row['img_per_s']:.1f} img/s, {row['step_ms']:.1f} ms/step, "
                             f"MFU {_pct(row.get('mfu'))} of the measured matmul rate, {peak}"),
              file=sys.stderr, flush=True)

    if args.ablate:
        def save_variant(key: str, row: Dict[str, Any]) -> None:
            save(key, {**row, "variant": ABLATIONS[key][0]})

        builders = {key: _builder(args, "fastbeit", bs.StepOptions(**ABLATIONS[key][1])) for key in args.ablation_list}
        bs.sweep(builders, args.warmup, args.iters, on_row=save_variant)
        results["tokenizer_forms"] = report_forms(args, results["rows"].get("base"))
        return results

    def after(name: str, contender: bs.Contender) -> None:
        if name == "fastbeit" and not args.no_profile:
            try:
                results["breakdown"] = bs.profile_breakdown(contender, args.profile_steps, warmup=0)
            except Exception as exc:  # the throughput rows matter more than the breakdown
                results["breakdown_error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"warning: profiler breakdown failed: {results['breakdown_error']}", file=sys.stderr)

    bs.sweep({name: _builder(args, name) for name in args.contender_list}, args.warmup, args.iters,
             on_row=save, after=after)
    results["tokenizer_forms"] = report_forms(args, results["rows"].get("fastbeit"))
    write_json(out / "results.json", results)
    return results


# ------------------------------------------------------------------------- pytest-benchmark JSON


def load_benchmark_json(path: str) -> Dict[str, Any]:
    """A pytest-benchmark JSON as this report's results: step rows (``extra_info`` with a
    ``contender``) grouped by configuration, and every other benchmark as a plain row."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--from-json: no such file {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--from-json: {file} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise UserError(f"--from-json: {file} has no 'benchmarks' list (not a pytest-benchmark JSON?)")
    groups: Dict[str, Dict[str, Any]] = {}
    others: List[Dict[str, Any]] = []
    matmul = None
    for bench in data["benchmarks"]:
        extra, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
        if "matmul_tflops" in extra:
            matmul = {"dtype": extra.get("dtype", "?"), "tflops": float(extra["matmul_tflops"])}
        if "contender" in extra and "img_per_s" in extra:
            key = (f"{extra.get('model', '?')} B={extra.get('batch', '?')} {extra.get('img_size', '?')} px "
                   f"{extra.get('amp', '?')} on {extra.get('device', '?')}")
            groups.setdefault(key, {})[extra["contender"]] = {**extra, "mean_s": stats.get("mean")}
        else:
            others.append({"name": bench.get("fullname") or bench.get("name", "?"), "group": bench.get("group"),
                           "mean_s": stats.get("mean"), "stddev_s": stats.get("stddev"),
                           "rounds": stats.get("rounds"), "extra_info": extra})
    machine, commit = data.get("machine_info") or {}, data.get("commit_info") or {}
    cpu = machine.get("cpu") or {}
    env = {
        "date": data.get("datetime", "?"),
        "host": machine.get("node", "?"),
        "cpu": cpu.get("brand_raw", "?") if isinstance(cpu, dict) else str(cpu),
        "python": machine.get("python_version", "?"),
        "commit": f"{commit.get('id', '?')}{' (dirty)' if commit.get('dirty') else ''}",
        "pytest-benchmark": data.get("version", "?"),
    }
    for rows in groups.values():
        for row in rows.values():
            flops = _row_flops(row)
            if flops is not None:
                add_mfu(row, flops.training, matmul["tflops"] if matmul else None)
    return {"kind": "json", "source": str(file), "env": env, "groups": groups, "others": others, "matmul": matmul}


def _row_flops(row: Dict[str, Any]) -> Optional[StepFlops]:
    """FLOPs per image of a benchmark row from its ``extra_info`` (None when fields are missing)."""
    try:
        cfg = make_config(row["model"], img_size=row["img_size"], patch_size=row["patch_size"],
                          vocab_size=row["vocab_size"], depth=row.get("depth"))
        tok = bs.tokenizer_config(cfg.grid[0], row["vocab_size"], row["tokenizer_size"])
        return step_flops(cfg, tok, row["masked_per_image"])
    except (KeyError, TypeError, UserError):
        return None


# ---------------------------------------------------------------------------------- formatting


def _num(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _mem(value: Optional[int]) -> str:
    return "n/a (CPU)" if value is None else f"{value / GIB:.2f} GiB"


def _ratio(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> str:
    if b is None or "img_per_s" not in a or "img_per_s" not in b or not b["img_per_s"]:
        return "–"
    return f"×{a['img_per_s'] / b['img_per_s']:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _settings_note(row: Dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    parts = [f"attn {row.get('attn_backend')}", f"kernels {row.get('kernels')}",
             "fused AdamW" if row.get("fused_adamw") else "AdamW (foreach)"]
    if row.get("compile"):
        parts.append("torch.compile")
    if row.get("exact_masks"):
        parts.append("exact masks")
    if row.get("host_sync"):
        parts.append("host sync")
    return ", ".join(parts)


def _header(title: str, env: Dict[str, Any], cpu: bool, stopped: Optional[str] = None) -> List[str]:
    lines = [f"# {title}", ""]
    if stopped:
        lines += [f"> **Incomplete:** {stopped}.", ""]
    if cpu:
        lines += ["> **CPU sanity run.** These figures check that the harness works end to end at tiny shapes;",
                  "> they say nothing about fastbeit's speed on a GPU.", ""]
    lines += [f"- {k}: `{v}`" for k, v in env.items()] + [""]
    return lines


def _pct(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def _step_rows_table(rows: Dict[str, Dict[str, Any]]) -> List[str]:
    baselines = [rows.get(k) for k in ("reference", "timm", "timm-compile")]
    body = []
    for name, row in rows.items():
        ok = "img_per_s" in row
        body.append([
            f"**{name}**" if name.startswith("fastbeit") else name,
            _num(row.get("img_per_s")) if ok else "–",
            _num(row.get("step_ms")) if ok else "–",
            *(_ratio(row, b) for b in baselines),
            _mem(row.get("peak_mem_bytes")) if ok else "–",
            _pct(row.get("mfu_peak")), _pct(row.get("mfu")),
            _num(row.get("compile_s")) if ok else "–",
            _settings_note(row),
        ])
    header = ["contender", "img/s", "ms/step", "vs reference", "vs timm", "vs timm-compile", "peak memory",
              "MFU (datasheet peak)", "MFU (measured matmul)", "warm-up excess s (compile)", "settings"]
    return _table(header, body)


def _flops_lines(results: Dict[str, Any]) -> List[str]:
    f, enc = results["flops"], results["encoder_breakdown"]
    g = lambda v: f"{v / 1e9:.3f}"
    body = [["encoder forward", g(f["encoder_forward"])]]
    body += [[f"  · {k}", g(v)] for k, v in enc.items()]
    body += [["lm_head forward (masked tokens only)", g(f["head_forward"])],
             ["tokenizer forward (no grad)", g(f["tokenizer_forward"])],
             ["**training step** = 3 × (encoder + head) + tokenizer", f"**{g(f['training'])}**"]]
    m = results["matmul"]
    return ["## FLOPs per image (analytic, matmuls and convolutions)", ""] + _table(["part", "GFLOP"], body) + [
        "", f"Matmul rate measured in this run ({m['dtype']}, large square matmuls, best of 3): "
        f"**{m['tflops']:.3g} TFLOP/s**. MFU = img/s × training FLOPs per image / a rate: "
        f"{_peak_note(results['rows'].values())} and the measured rate.", ""]


def _peak_note(rows) -> str:
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    if peak is None:
        return "no datasheet peak on file for this device and dtype (MFU against a peak: n/a)"
    return f"the datasheet's dense bf16 peak ({peak:g} TFLOP/s)"


def _breakdown_lines(results: Dict[str, Any]) -> List[str]:
    bd = results.get("breakdown")
    if not bd:
        err = results.get("breakdown_error")
        return ["## Where a fastbeit step's time goes", "", f"Profiler breakdown failed: `{err}`", ""] if err else []
    total = bd["profiled_ms"] or float("nan")
    body = []
    for comp, ph in bd["components"].items():
        both = ph["forward"] + ph["backward"]
        share = f"{100 * both / total:.1f} %"
        body.append([comp, _num(ph["forward"], 2), _num(ph["backward"], 2), _num(both, 2), share])
    step = results["rows"].get("fastbeit", {}).get("step_ms")
    return [
        "## Where a fastbeit step's time goes (torch.profiler)", "",
        f"Per step, {bd['timer']} time; backward ops are charged to the forward part that created them "
        "(autograd sequence numbers). `norm`: the blocks' LayerNorms (the final one is in `loss`); `other`: residual "
        "adds, LayerScale, the backward engine's own work.", "",
        *_table(["component", "forward / no-grad ms", "backward ms", "total ms", "share"], body), "",
        f"Profiled total {_num(total, 2)} ms/step against {_num(step, 2)} ms/step timed without the profiler "
        "(the profiler adds overhead; on CUDA, idle gaps between kernels are not counted).", "",
    ]


def comparison_markdown(results: Dict[str, Any]) -> str:
    s, env = results["settings"], results["env"]
    cpu = env["device"] == "cpu"
    masked = next((r["masked_per_image"] for r in results["rows"].values() if "masked_per_image" in r), None)
    tok = next((r["tokenizer"] for r in results["rows"].values() if "tokenizer" in r), s["tokenizer"])
    lines = _header("fastbeit: whole pre-training step", env, cpu, results.get("stopped"))
    lines += ["## Settings", "",
              f"{s['model']} (depth {s['depth'] or 'preset'}), {s['img_size']} px, patch {s['patch_size']}, batch "
              f"{s['batch']}, amp {s['amp']}; tokenizer {tok}; blockwise masks, {_num(masked, 2)} masked patches per "
              f"image on average (the same masks for every contender); {s['warmup']} warm-up + {s['iters']} timed "
              "steps. Each step: tokenizer encode (no grad) → forward → loss → backward → clip → AdamW, data "
              "already on the device.", "",
              "## Throughput", "", *_step_rows_table(results["rows"]), "",
              "Ratios are between contenders measured in this run (higher is faster).", "",
              "![img/s](img_per_s.png)", "", "![peak memory](peak_memory.png)", ""]
    lines += _flops_lines(results) + _breakdown_lines(results)
    lines += forms_markdown(results.get("tokenizer_forms"), s["batch"])
    return "\n".join(lines) + "\n"


def ablation_markdown(results: Dict[str, Any]) -> str:
    env, s = results["env"], results["settings"]
    rows = results["rows"]
    base = rows.get("base")
    lines = _header("fastbeit: step optimizations one at a time", env, env["device"] == "cpu", results.get("stopped"))
    lines += [f"{s['model']}, {s['img_size']} px, patch {s['patch_size']}, batch {s['batch']}, amp {s['amp']}; "
              f"{s['warmup']} warm-up + {s['iters']} timed steps per row. Each row changes one thing from the first.",
              ""]
    body = []
    for key, row in rows.items():
        ok = "img_per_s" in row
        body.append([key, row.get("variant", ABLATIONS.get(key, ("?",))[0]),
                     _num(row.get("img_per_s")) if ok else "–", _num(row.get("step_ms")) if ok else "–",
                     _ratio(row, base) if ok else "–", _mem(row.get("peak_mem_bytes")) if ok else "–",
                     _pct(row.get("mfu_peak")), _pct(row.get("mfu")), _settings_note(row)])
    lines += _table(["row", "variant", "img/s", "ms/step", "vs first row", "peak memory", "MFU (datasheet peak)",
                     "MFU (measured matmul)", "settings"], body)
    lines += ["", "![ablation](ablation.png)", ""] + _flops_lines(results)
    lines += forms_markdown(results.get("tokenizer_forms"), s["batch"])
    return "\n".join(lines) + "\n"


def json_markdown(results: Dict[str, Any]) -> str:
    devices = {row.get("device") for rows in results["groups"].values() for row in rows.values()}
    lines = _header("fastbeit benchmarks (pytest-benchmark JSON)", {"source": results["source"], **results["env"]},
                    cpu=devices == {"cpu"})
    for key, rows in results["groups"].items():
        lines += [f"## Whole step: {key}", "", *_step_rows_table(rows), ""]
    if results["groups"]:
        m = results.get("matmul")
        rate = "No matmul-rate benchmark in the file: no MFU."
        if m:
            rate = (f"MFU is against {_peak_note(r for g in results['groups'].values() for r in g.values())} "
                    f"and the matmul rate measured in the same run ({m['dtype']}: {m['tflops']:.3g} TFLOP/s), "
                    "with the analytic FLOPs of `fastbeit.flops`.")
        lines += ["Ratios are between contenders of the same benchmark run. " + rate, "",
                  "![img/s](img_per_s.png)", "", "![peak memory](peak_memory.png)", ""]
    if results["others"]:
        body = []
        for o in results["others"]:
            extra = ", ".join(f"{k}={v}" for k, v in o["extra_info"].items() if isinstance(v, (int, float, str)))
            mean = o["mean_s"] * 1e3 if o["mean_s"] is not None else None
            std = o["stddev_s"] * 1e3 if o["stddev_s"] is not None else None
            body.append([o["name"], o["group"] or "", _num(mean, 3), _num(std, 3), o["rounds"], extra[:200]])
        lines += ["## Other benchmarks", "", *_table(["benchmark", "group", "mean ms", "stddev ms", "rounds", "extra"],
                                                      body), ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- outputs


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def bar_chart(labels: Sequence[str], values: Sequence[Optional[float]], path: Path, title: str, xlabel: str,
              empty_note: str = "not measured") -> None:
    """Horizontal bars with their values; missing values are drawn as a note, not a zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.6))
    known = [v for v in values if v is not None]
    top = max(known) if known else 1.0
    ys = list(range(len(labels)))[::-1]
    for y, v in zip(ys, values):
        if v is None:
            ax.text(0.01 * top, y, empty_note, va="center", color="grey")
        else:
            ax.barh(y, v, color="tab:blue")
            ax.text(v, y, f" {v:,.3g}", va="center")
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _charts(rows: Dict[str, Dict[str, Any]], out: Path, subtitle: str, ablation: bool = False) -> None:
    labels = list(rows)
    speed = [r.get("img_per_s") for r in rows.values()]
    mem = [r["peak_mem_bytes"] / GIB if r.get("peak_mem_bytes") is not None else None for r in rows.values()]
    if ablation:
        bar_chart(labels, speed, out / "ablation.png", f"step throughput per variant\n{subtitle}", "images / s",
                  "skipped")
        return
    bar_chart(labels, speed, out / "img_per_s.png", f"whole pre-training step\n{subtitle}", "images / s", "skipped")
    bar_chart(labels, mem, out / "peak_memory.png", f"peak device memory\n{subtitle}", "GiB",
              "n/a (measured on CUDA only)")


def write_report(results: Dict[str, Any], out: Path) -> Path:
    """report.md, results.json and the charts for any kind of results."""
    out.mkdir(parents=True, exist_ok=True)
    if results["kind"] == "json":
        groups = results["groups"]
        if len(groups) == 1:  # one configuration: contender names, the configuration in the title
            (key, flat), = groups.items()
        else:
            key = Path(results["source"]).name
            flat = {f"{name} | {g}": row for g, rows in groups.items() for name, row in rows.items()}
        _charts(flat, out, key)
        text = json_markdown(results)
    else:
        s, env = results["settings"], results["env"]
        subtitle = f"{s['model']} B={s['batch']} {s['amp']} on {env['device']}"
        _charts(results["rows"], out, subtitle, ablation=results["kind"] == "ablation")
        text = ablation_markdown(results) if results["kind"] == "ablation" else comparison_markdown(results)
    write_json(out / "results.json", results)
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _measure_until_stopped(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Measure every contender; on Ctrl-C or SIGTERM (``timeout`` on a GPU session; ``cli_entry``
    turns it into KeyboardInterrupt, which the per-contender ``except Exception`` lets through)
    stop and keep what was measured."""
    results: Dict[str, Any] = {}
    try:
        measure_all(args, out, results)
    except KeyboardInterrupt as exc:
        results["stopped"] = f"stopped early ({exc or 'interrupted'}); only the rows shown were measured"
        print(f"warning: {results['stopped']}", file=sys.stderr)
    return results


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan" in argv:
        from fastbeit.plan import main as plan_main

        return plan_main([a for a in argv if a != "--plan"])
    args = resolve_args(argv)
    out = Path(args.output)
    if args.from_json:
        results = load_benchmark_json(args.from_json)
    else:
        results = _measure_until_stopped(args, out)
        if "rows" not in results:
            print("error: stopped before any contender was measured; no report written", file=sys.stderr)
            return 1
    path = write_report(results, out)
    print(f"wrote {path}")
    return 1 if "stopped" in results else 0


if __name__ == "__main__":
    sys.exit(main())
