"""The results note of a GPU run, from whatever the run has left so far.

    python benchmarks/gpu_summary.py RESULTS_DIR [--out DIR]

``benchmarks/gpu_run.sh`` calls this after every stage, so a run cut short (a stage at its time
limit, the device call itself killed) still returns a note and a JSON of the figures that did come
back: the status of each stage, the kernel check's failures, the whole-step table with its ratios
and both MFUs, the attention benchmark against the model's own eager path and SDPA, the ablation
and the reproduction. Standard library only (it must run in well under a second, and even where
torch would not import). Writes ``summary.md`` and ``summary.json`` to ``--out`` (default: the
results folder): the draft of the ``benchmarks/results/`` note.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

GIB = 2**30


def _load(path: Path) -> Optional[Any]:
    """A JSON file, or None when it is missing or torn (a stage killed while writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pct(v: Optional[float]) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{100 * v:.1f} %"


def _num(v: Optional[float], digits: int = 1) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:,.{digits}f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def environment(results: Path) -> Dict[str, str]:
    """Device, driver and versions from the env stage's log."""
    env: Dict[str, str] = {}
    try:
        text = (results / "env.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return env
    for line in text.splitlines():
        m = re.search(r"Driver Version:\s*(\S+)", line)
        if m:
            env["driver"] = m.group(1)
        if line.startswith(("python ", "device ")):
            env[line.split()[0]] = line.split(" ", 1)[1]
        for name in ("triton", "timm", "safetensors", "scipy", "pytest_benchmark"):
            if line.startswith(name + " "):
                env[name] = line.split(" ", 1)[1]
    sha = re.search(r"^[0-9a-f]{40}$", text, re.M)
    if sha:
        env["commit"] = sha.group(0)
    return env


def check_part(data: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not data:
        return {"ran": False}
    rows = data.get("rows", [])
    failed = [r for r in rows if not r.get("ok")]
    worst: Dict[str, Any] = {}
    for r in rows:
        v = r.get("value")
        if r.get("kind") in ("rel err", "per-tensor rel err") and isinstance(v, (int, float)):
            if r["check"] not in worst or v > worst[r["check"]]["value"]:
                worst[r["check"]] = {"value": v, "case": r["case"], "output": r["output"], "bound": r["bound"]}
    return {"ran": True, "rows": len(rows), "failed": failed, "worst": worst, "stopped": data.get("stopped")}


def step_part(data: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The whole-step rows with their ratios against each baseline of the same run."""
    if not data or "rows" not in data:
        return {}
    rows = data["rows"]
    speed = {k: r.get("img_per_s") for k, r in rows.items()}
    out = {}
    for name, r in rows.items():
        ratios = {f"vs {b}": speed[name] / speed[b] for b in ("reference", "timm", "timm-compile")
                  if speed.get(b) and speed.get(name)}
        keep = ("img_per_s", "step_ms", "peak_mem_bytes", "mfu", "mfu_peak", "peak_tflops", "compile_s", "skipped",
                "attn_backend", "kernels", "compile", "batch", "tokenizer")
        out[name] = {**{k: r.get(k) for k in keep if k in r}, **ratios}
    return {"rows": out, "matmul": data.get("matmul"), "flops_training": (data.get("flops") or {}).get("training"),
            "stopped": data.get("stopped"), "breakdown": data.get("breakdown")}


def bench_part(data: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """pytest-benchmark rows: mean ms per benchmark, grouped, with ratios to the group's eager row."""
    if not data:
        return {}
    groups: Dict[str, Dict[str, float]] = {}
    for b in data.get("benchmarks", []):
        mean = (b.get("stats") or {}).get("mean")
        if mean is None:
            continue
        impl = (b.get("extra_info") or {}).get("impl") or b.get("name", "?")
        groups.setdefault(b.get("group") or "?", {})[impl] = 1e3 * mean
    return groups


def summarize(results: Path) -> Dict[str, Any]:
    status = ""
    try:
        status = (results / "status.txt").read_text(encoding="utf-8")
    except OSError:
        pass
    return {
        "status": status.splitlines(),
        "env": environment(results),
        "check": check_part(_load(results / "check.json")),
        "step": step_part(_load(results / "report" / "results.json")),
        "bench": bench_part(_load(results / "bench.json")),
        "ablation": step_part(_load(results / "ablate" / "results.json")),
        "reproduce": _load(results / "reproduce" / "results.json"),
    }


def markdown(s: Dict[str, Any]) -> str:
    env = s["env"]
    lines = [f"# {env.get('device', '<GPU>')} — <date>", "",
             "Draft written by benchmarks/gpu_summary.py from what the run returned; edit before committing.", "",
             f"- Device: {env.get('device', '?')}, driver {env.get('driver', '?')}",
             f"- Versions: {env.get('python', '?')}; triton {env.get('triton', '?')}, timm {env.get('timm', '?')}",
             f"- Commit: {env.get('commit', '?')}", "", "## Stages", "", "```", *s["status"], "```", ""]
    c = s["check"]
    lines += ["## Kernel and model check", ""]
    if not c["ran"]:
        lines += ["Did not run or left no check.json.", ""]
    else:
        head = f"{c['rows'] - len(c['failed'])}/{c['rows']} rows ok" + (f"; {c['stopped']}" if c["stopped"] else "")
        if c["failed"]:
            head += ". Failures (reported; the later stages ran the default paths regardless):"
        lines += [head, ""]
        lines += [f"- {r['check']} | {r['case']} | {r['output']}: {r.get('value')} (bound {r.get('bound')})"
                  + (f" {r['error'][-200:]!r}" if r.get("error") else "") for r in c["failed"]]
        lines += ["", "Worst relative error per check: " + "; ".join(
            f"{k} {v['value']:.3g} ({v['output']}, {v['case']})" for k, v in c["worst"].items()), ""]
    lines += step_lines("Whole step", s["step"]) + step_lines("Ablation", s["ablation"])
    if s["bench"]:
        lines += ["## Kernel and attention benchmarks (mean ms)", ""]
        for group, impls in s["bench"].items():
            lines.append(f"- {group}: " + ", ".join(f"{k} {v:.3f}{_speedups(impls, k)}" for k, v in impls.items()))
        lines.append("")
    if s["reproduce"]:
        lines += ["## Reproduction (top-1 %)", ""] + [f"- {k}: {v}" for k, v in s["reproduce"].items()] + [""]
    return "\n".join(lines) + "\n"


def _speedups(impls: Dict[str, float], name: str) -> str:
    """`` (×2.00 vs eager, ×1.50 vs sdpa)``: over the model's eager and SDPA paths of the same group."""
    v = impls[name]
    r = [f"×{impls[b] / v:.2f} vs {b}" for b in ("eager", "sdpa") if b in impls and b != name and v]
    return f" ({', '.join(r)})" if r else ""


def step_lines(title: str, part: Dict[str, Any]) -> List[str]:
    if not part:
        return [f"## {title}", "", "Not measured in this run.", ""]
    body = []
    for name, r in part["rows"].items():
        if "skipped" in r:
            body.append([name, "skipped: " + str(r["skipped"])[:120]] + ["–"] * 8)
            continue
        mem = r.get("peak_mem_bytes")
        body.append([name, _num(r.get("img_per_s")), _num(r.get("step_ms")),
                     *(f"×{r[k]:.2f}" if k in r else "–" for k in ("vs reference", "vs timm", "vs timm-compile")),
                     "–" if mem is None else f"{mem / GIB:.2f} GiB", _pct(r.get("mfu_peak")), _pct(r.get("mfu")),
                     _num(r.get("compile_s"))])
    m = part.get("matmul") or {}
    out = [f"## {title}", "", *_table(["contender", "img/s", "ms/step", "vs reference", "vs timm", "vs timm-compile",
                                       "peak memory", "MFU (datasheet peak)", "MFU (measured matmul)",
                                       "warm-up excess s"], body), ""]
    if m:
        out += [f"Matmul rate measured in the same run: {m.get('tflops', 0):.3g} TFLOP/s ({m.get('dtype')}); "
                f"training FLOPs per image: {_num((part.get('flops_training') or 0) / 1e9)} G.", ""]
    if part.get("stopped"):
        out += [f"Incomplete: {part['stopped']}.", ""]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="the run's results folder ($RESULTS of gpu_run.sh)")
    p.add_argument("--out", default=None, help="where summary.md and summary.json go (default: the results folder)")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out or results)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(results)
    for name, text in (("summary.json", json.dumps(s, indent=1, default=str)), ("summary.md", markdown(s))):
        tmp = out / (name + ".part")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
