"""The measured column of the plan: time per part of the real (eager) fastbeit step.

``torch.profiler`` self time of every event, given its part by the plan's rules
(:func:`fastbeit.plan_count.part_of`): forward events by the innermost module range opened from
module hooks, backward events by the scope of the forward op with their autograd sequence number.
On CUDA the time is the device time of the kernels; on a CPU it is CPU time (a smoke test only).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastbeit import bench_step as bs
from fastbeit.plan_count import _BMM_OPS, PARTS, PlanSettings, Scope, part_of


def measure_parts(settings: PlanSettings, device: str, steps: int = 3) -> Tuple[Dict[str, float], str]:
    """Time per part of the real (eager) fastbeit step: profiler self time of every op, given its
    part by the same rules as the plan (module scope, forward ranges; backward by autograd
    sequence number). CUDA: kernel time on the device; CPU: CPU time (a smoke test only)."""
    from torch.profiler import ProfilerActivity, profile

    s = settings
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    contender = bs.build_contender(
        "fastbeit", s.model, s.batch, s.img_size, s.patch_size, s.amp, dev, vocab_size=s.vocab,
        tokenizer_size=s.tokenizer, seed=s.seed, depth=s.depth,
        options=bs.StepOptions(attn_backend="auto" if cuda else s.attn, kernels="auto" if cuda else "reference"))
    try:
        bs.run_steps(contender, 1)
        ranges = _ScopeRanges()
        handles = ranges.watch(contender.model, "model") + ranges.watch(contender.tokenizer, "tokenizer")
        try:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                bs.run_steps(contender, steps)
        finally:
            for h in handles:
                h.remove()
            ranges.close_all()
        totals = _attribute_parts(prof.events(), cuda)
    finally:
        contender.close()
    label = "fastbeit step without compile, " + ("CUDA kernel time" if cuda else "CPU time")
    return {p: v / 1e3 / steps for p, v in totals.items()}, label


_RANGE = "plan::"


class _ScopeRanges:
    """``record_function`` ranges ``plan::region|fqn`` around every submodule's forward (hooks)."""

    def __init__(self) -> None:
        self.stack: List[Any] = []

    def watch(self, root: nn.Module, region: str) -> List[Any]:
        handles = []
        for name, mod in root.named_modules():
            if not name:
                continue

            def pre(_m, _a, name=name):
                rf = torch.autograd.profiler.record_function(f"{_RANGE}{region}|{name}")
                rf.__enter__()
                self.stack.append(rf)

            def post(_m, _a, _o):
                if self.stack:
                    self.stack.pop().__exit__(None, None, None)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return handles

    def close_all(self) -> None:
        while self.stack:
            self.stack.pop().__exit__(None, None, None)


def _event_kind(name: str) -> str:
    op = name.split("::")[-1]
    if op in _BMM_OPS:
        return "bmm"
    if "attention" in op.lower():
        return "attention"
    if "conv" in op:
        return "conv"
    return "matmul" if op in ("mm", "addmm", "linear", "matmul") else "other"


def _attribute_parts(events, cuda: bool) -> Dict[str, float]:
    """Self time (µs) of every profiler event per part, by the plan's rules: forward events take
    the innermost ``plan::`` module range (root-level ones: before or after the final norm),
    backward events the scope of the forward op with their autograd sequence number."""
    from torch.autograd import DeviceType

    out = {p: 0.0 for p in PARTS}
    seq_scope: Dict[int, Scope] = {}
    state = {"after_norm": False, "pre_qkv": False}

    def visit(ev, scope: Optional[Scope], phase: str) -> None:
        name = ev.name
        if name.startswith(_RANGE):
            region, fqn = name[len(_RANGE):].split("|")
            if fqn == "patch_embed":
                state["after_norm"] = False
            if fqn.endswith(".attn"):
                state["pre_qkv"] = True
            scope = Scope(region, fqn, False, False)
        elif name in (bs.RANGE_PREFIX + "tokenizer", bs.RANGE_PREFIX + "optimizer"):
            scope = Scope(name[len(bs.RANGE_PREFIX):], "", False, False)
        elif name.startswith("autograd::engine::evaluate_function:"):
            phase, scope = "backward", seq_scope.get(ev.sequence_nr, scope)
        kind = _event_kind(name)
        if phase == "forward":
            if scope is None:
                scope = Scope("model", "", state["after_norm"], False)
            elif scope.fqn.endswith(".attn"):
                scope = scope._replace(pre_qkv=state["pre_qkv"])
                if kind == "matmul":
                    state["pre_qkv"] = False
            if ev.sequence_nr >= 0:
                seq_scope[ev.sequence_nr] = scope
        use = scope or Scope("model", "", True, False)  # backward events of no forward op: the loss's start
        out[part_of(use, kind)[0]] += bs._self_time(ev, cuda)  # ranges too: kernels launched right inside them
        for child in ev.cpu_children:
            visit(child, scope, phase)
        if name == f"{_RANGE}model|norm":
            state["after_norm"] = True

    on_cpu = lambda e: getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU
    for ev in sorted((e for e in events if e.cpu_parent is None and on_cpu(e)), key=lambda e: e.time_range.start):
        visit(ev, None, "forward")
    return out
