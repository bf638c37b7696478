"""Where the time of a pre-training step goes, before a GPU measures it: a roofline plan.

    python -m fastbeit.report --plan                  # BEiT-Base, batch 256, bf16, DALL-E tokenizer
    python -m fastbeit.report --plan --output runs/plan --measure   # + measured time per part (GPU)

The real step (tokenizer forward, ``forward_loss``, backward) runs at full size on fake tensors
(meta storage: no memory, no arithmetic) under CPU autocast bf16, which casts every op this step
runs as CUDA's autocast does (norms and softmax already get float32 inputs). A dispatch mode
records every aten op with its FLOPs (``torch.utils.flop_counter``'s formulas: matmuls, convs and
attention only, as :mod:`fastbeit.flops`) and the bytes it moves (inputs read + outputs written,
each tensor counted by the elements its strides reach; views move nothing). Each op belongs to a
part of the step by its module scope (backward ops by the scope of the forward op that made their
autograd node) and its kind. The optimizer (grad-norm clip + fused AdamW, fp32) is counted from
the parameter count.

Two columns: ``eager`` as counted, and ``fused`` (estimate): flash attention, the gathered
cross entropy and the masked embedding as one kernel each (bytes from their shapes), and every
other chain of element-wise ops fused as ``torch.compile`` would (see :func:`fuse_chains`).
Time of a kernel = max(FLOPs / (peak · eff), bytes / (bandwidth · eff_mem)); a part's time is
the sum over its kernels; launch gaps are assumed hidden (CUDA graphs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from fastbeit import bench_step as bs
from fastbeit.config import PRESETS, make_config
from fastbeit.errors import UserError, cli_entry
from fastbeit.flops import step_flops

PARTS = ("tokenizer", "patch embed", "attention", "matmuls", "norm & elementwise", "loss", "optimizer")


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
    """Fractions of the datasheet rates a kernel reaches (assumptions until a GPU measures them)."""

    gemm: float = 0.65  # cuBLAS bf16 GEMMs of these sizes (M = 50k, K, N = 768..3072): ~600-700 TFLOP/s on H100
    conv: float = 0.5  # cuDNN bf16 3x3 / 1x1 convolutions, channels_last: implicit GEMM, below plain GEMMs
    attention: float = 0.35  # flash attention at head dim 64, N = 197: FlashAttention-2-class ~300-350 TFLOP/s
    memory: float = 0.85  # streaming element-wise kernels: ~80-90% of HBM bandwidth
    sources: Tuple[str, ...] = (
        "GEMM: NVIDIA's H100 cuBLAS bf16 GEMM figures and public MLPerf-era benchmarks put large bf16 GEMMs at "
        "600-750 TFLOP/s (60-75% of 989); 0.65 is taken for K, N of 768-3072",
        "attention: FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608) benchmarks FlashAttention-2 on "
        "H100 at roughly 300-350 TFLOP/s for head dim 64; short sequences (197) do not reach more",
        "memory: streaming copies reach 80-90% of HBM bandwidth on H100 (Luo et al. 2024, 'Benchmarking and "
        "Dissecting the Nvidia Hopper GPU Architecture', arXiv:2402.13499)",
        "conv: assumed 50% of peak for cuDNN bf16 convolutions with 64-512 channels (no published figure used)",
    )

    def compute(self, kind: str) -> float:
        return {"conv": self.conv, "bmm": self.attention, "attention": self.attention}.get(kind, self.gemm)


# ------------------------------------------------------------------------------------- recording


class Scope(NamedTuple):
    """Where a forward op ran: region (tokenizer / model), innermost module name, and two flags."""

    region: str
    fqn: str
    after_norm: bool  # the model's final norm has run: root-level ops belong to the loss
    pre_qkv: bool  # inside an attention module before its qkv matmul (bias cat, weight casts)


@dataclass
class OpRecord:
    """One dispatched op: what it was, where it belongs, its FLOPs and the tensors it touched."""

    name: str
    kind: str  # matmul | conv | bmm | attention | norm | view | other
    phase: str  # forward | backward
    part: str
    sub: str  # "masked embed" for the embedding's element-wise ops, else ""
    flops: float
    reads: List[Tuple[int, int]]  # (storage key, bytes)
    writes: List[Tuple[int, int]]

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.reads) + sum(b for _, b in self.writes)


_QUERY_OPS = {"is_contiguous", "size", "stride", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_strides_like_format", "is_non_overlapping_and_dense", "sym_is_contiguous", "dim", "numel",
              "device", "layout"}
_FREE_OPS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "_local_scalar_dense"}
_NORM_OPS = {"native_layer_norm", "native_layer_norm_backward", "layer_norm"}
_BMM_OPS = {"bmm", "baddbmm"}
_BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}


def _footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor's strides reach (a broadcast dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(tree: Any) -> List[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _op_kind(func) -> str:
    name = func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)
    schema = getattr(func, "_schema", None)
    if schema is not None and schema.returns and all(
            r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return "view"
    if "attention" in name or "attn" in name:
        return "attention"
    if "conv" in name:
        return "conv"
    if name in _BMM_OPS:
        return "bmm"
    if name in _NORM_OPS:
        return "norm"
    if func._overloadpacket in flop_registry:
        return "matmul"
    return "other"


def _op_flops(func, args, kwargs, out, warned: set) -> float:
    """FLOPs from torch's registered formulas; sdpa variants it lacks; 0 with a warning otherwise."""
    packet = func._overloadpacket
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))
    name = packet.__name__
    if "scaled_dot_product" in name:
        shapes = [t.shape for t in _tensors(args)]
        if "backward" in name:  # (grad_out, q, k, v, ...)
            return float(sdpa_backward_flop_count(*shapes[:4]))
        return float(sdpa_flop_count(*shapes[:3]))
    namespace = str(func).split(".")[0].split("::")[0]
    if namespace not in ("aten", "prim", "prims") and str(packet) not in warned:
        warned.add(str(packet))
        warnings.warn(f"plan: {packet} has no FLOP formula (torch.utils.flop_counter.register_flop_formula); "
                      "counted with 0 FLOPs, its bytes and part from its tensors and module scope", stacklevel=2)
    return 0.0


def part_of(scope: Scope, kind: str) -> Tuple[str, str]:
    """(part, sub) of an op of ``kind`` run in ``scope`` (backward ops: their forward op's scope)."""
    if scope.region != "model":
        return scope.region, ""
    names = scope.fqn.split(".") if scope.fqn else []
    matmul = kind in ("matmul", "conv")
    if "patch_embed" in names:
        return "patch embed", ""
    if "rel_pos_bias" in names:
        return "attention", ""
    if "blocks" in names:
        if kind == "attention" or (names[-1] == "attn" and not scope.pre_qkv):
            return ("matmuls" if matmul else "attention"), ""
        return ("matmuls" if matmul or kind == "bmm" else "norm & elementwise"), ""
    if names[:1] == ["norm"]:
        return "norm & elementwise", ""
    if names[:1] == ["lm_head"] or scope.after_norm:
        return "loss", ""
    return "patch embed", "masked embed"


class StepRecorder(TorchDispatchMode):
    """Records every op of a step with FLOPs, bytes and part (see the module docstring).

    Data-dependent ops cannot run on fake tensors; their sizes come from the real masks: a
    boolean tensor with the mask's number of elements has the mask's number of ``True`` values
    (``nonzero``, boolean indexing). ``.item()`` reads 0 (only value checks read it). Each of those
    is a host sync on a GPU and is counted in :attr:`host_syncs`.
    """

    def __init__(self, true_counts: Dict[int, int]) -> None:
        super().__init__()
        self.true_counts = true_counts
        self.records: List[OpRecord] = []
        self.host_syncs: Dict[str, int] = {}
        self.region = "model"
        self.stack: List[str] = []
        self.after_norm = False
        self.pre_qkv = False
        self._seq_scope: Dict[int, Scope] = {}
        self._last_bw: Optional[Scope] = None
        # storages stay alive, so their keys stay unique; tensors are not held (a held gradient
        # would make autograd copy it instead of stealing it, ops the real step does not run)
        self._keep: List[Any] = []
        self._warned: set = set()

    # -- module scope
    def watch(self, root: nn.Module, final_norm: Optional[nn.Module] = None) -> List[Any]:
        """Hooks on every submodule of ``root`` that keep :attr:`stack` at the running module."""
        handles = []
        for name, mod in root.named_modules():
            if not name:
                continue

            def pre(_m, _a, name=name):
                self.stack.append(name)
                if name.endswith(".attn"):
                    self.pre_qkv = True

            def post(_m, _a, _o):
                self.stack.pop()
                if _m is final_norm:
                    self.after_norm = True

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return handles

    @contextlib.contextmanager
    def region_of(self, region: str):
        previous, self.region = self.region, region
        try:
            yield
        finally:
            self.region = previous

    def _scope(self) -> Scope:
        return Scope(self.region, self.stack[-1] if self.stack else "", self.after_norm, self.pre_qkv)

    # -- data-dependent ops on fake tensors
    def _count_true(self, t: torch.Tensor) -> int:
        if t.numel() in self.true_counts:
            return self.true_counts[t.numel()]
        if "count" not in self._warned:
            self._warned.add("count")
            warnings.warn(f"plan: nonzero of an unknown boolean tensor {tuple(t.shape)}; assumed all True",
                          stacklevel=2)
        return t.numel()

    def _nonzero(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(self._count_true(t), t.dim(), dtype=torch.long, device=t.device)

    def _sync(self, name: str) -> None:
        self.host_syncs[name] = self.host_syncs.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _QUERY_OPS:
            return func(*args, **kwargs)
        if name == "_local_scalar_dense":
            self._sync(".item()")
            return False if args[0].dtype == torch.bool else (0.0 if args[0].is_floating_point() else 0)
        if name in ("nonzero", "argwhere"):
            self._sync("nonzero")
            out = self._nonzero(args[0])
            self._record(func, args, kwargs, out)
            return out
        if name in _BOOL_INDEX_OPS and any(t.dtype == torch.bool for t in _tensors(args[1])):
            self._sync("boolean index")
            indices = []
            for ix in args[1]:
                if ix is not None and ix.dtype == torch.bool:
                    indices += list(self._nonzero(ix).unbind(1))
                else:
                    indices.append(ix)
            args = (args[0], indices, *args[2:])
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func._overloadpacket.__name__
        node = torch._C._current_autograd_node()
        if node is None:
            phase, scope = "forward", self._scope()
            self._seq_scope.setdefault(torch._C._autograd._get_sequence_nr() - 1, scope)
        else:
            phase = "backward"
            scope = self._seq_scope.get(node._sequence_nr(), self._last_bw or self._scope())
            self._last_bw = scope
        kind = _op_kind(func)
        if kind in ("matmul",) and scope.pre_qkv and scope.fqn.endswith(".attn") and phase == "forward":
            self.pre_qkv = False  # the qkv projection: what follows in this module is attention proper
        part, sub = part_of(scope, kind)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        self._keep += [t.untyped_storage() for t in ins + outs]
        free = kind == "view" or name in _FREE_OPS
        key = lambda t: t.untyped_storage()._cdata
        seen, reads = set(), []
        for t in ins:
            if key(t) not in seen and not free:
                seen.add(key(t))
                reads.append((key(t), _footprint(t)))
        writes = [] if free else [(key(t), _footprint(t)) for t in outs]
        flops = _op_flops(func, args, kwargs, out, self._warned) if kind != "view" else 0.0
        self.records.append(OpRecord(str(func), kind, phase, part, sub, flops, reads, writes))


# ----------------------------------------------------------------------------------- the step


@dataclass
class PlanSettings:
    model: str = "beit_base"
    batch: int = 256
    img_size: int = 224
    patch_size: int = 16
    depth: Optional[int] = None
    vocab: int = 8192
    tokenizer: str = "dalle"
    amp: str = "bf16"
    attn: str = "eager"
    seed: int = 0


@dataclass
class CountedStep:
    """The recorded ops of one step and what the analytic estimates need."""

    settings: PlanSettings
    records: List[OpRecord]
    live: set  # storage keys alive after the step (parameter grads, loss): a fused chain writes them
    num_params: int
    masked_total: int
    host_syncs: Dict[str, int]
    flops_per_image_analytic: float
    seconds: float


class _MetaBuild(TorchDispatchMode):
    """Lets a model be built on the meta device: the truncated-normal init's rejection loop sees
    no rejected entries, and ``linspace`` (the drop-path rates, read with ``tolist``) runs on CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default and args[0].is_meta:
            return torch.empty(0, args[0].dim(), dtype=torch.long, device="meta")
        on_meta = torch.device(kwargs.get("device") or "cpu").type == "meta"
        if func._overloadpacket is torch.ops.aten.linspace and on_meta:
            return func(*args, **{**kwargs, "device": torch.device("cpu")})
        return func(*args, **kwargs)


def _fake_module(build, mode) -> nn.Module:
    """``build()`` on the meta device (no memory, no init cost), then every parameter and buffer
    replaced by a fake CPU tensor of the same shape, stride and dtype."""
    with torch.device("meta"), _MetaBuild():
        module = build()
    with mode:
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
                    mod._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)
    return module


def count_step(settings: PlanSettings) -> CountedStep:
    """Run the step on fake tensors at full size and record every op (a few seconds on a CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastbeit.model import BeitForMaskedImageModeling
    from fastbeit.tokenizer.dvae import DOWNSAMPLE, DiscreteVAE

    t0 = time.perf_counter()
    s = settings
    cfg = make_config(s.model, img_size=s.img_size, patch_size=s.patch_size, vocab_size=s.vocab, depth=s.depth,
                      attn_backend=s.attn, kernels="reference")
    grid = cfg.grid[0]
    tok_cfg = bs.tokenizer_config(grid, s.vocab, s.tokenizer)
    masks = bs.make_masks(s.batch, grid, seed=s.seed)
    masked_total = int(masks.sum())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_module(lambda: BeitForMaskedImageModeling(cfg), mode).train()
    tokenizer = _fake_module(lambda: DiscreteVAE(tok_cfg), mode).eval().requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recorder = StepRecorder({masks.numel(): masked_total})
    handles = recorder.watch(model, final_norm=model.norm) + recorder.watch(tokenizer)
    amp = bs.AMP_DTYPES[s.amp]
    autocast = lambda dt: torch.autocast("cpu", dtype=dt) if dt is not None else contextlib.nullcontext()
    try:
        with mode, recorder:
            images = torch.empty(s.batch, 3, s.img_size, s.img_size)
            view = torch.empty(s.batch, 3, grid * DOWNSAMPLE, grid * DOWNSAMPLE)
            fake_masks = torch.empty(masks.shape, dtype=torch.bool)
            with recorder.region_of("tokenizer"), torch.no_grad(), autocast(torch.bfloat16):
                ids = tokenizer.encode(view).flatten(1)
            with autocast(amp):
                out = model.forward_loss(images, fake_masks, ids)
            out.loss.backward()
            live = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
            live |= {out.loss.untyped_storage()._cdata, out.mlm_acc.untyped_storage()._cdata}
    finally:
        for h in handles:
            h.remove()
    per_image = step_flops(cfg, tok_cfg, masked_total / s.batch).training
    return CountedStep(settings, recorder.records, live, num_params, masked_total, dict(recorder.host_syncs),
                       per_image, time.perf_counter() - t0)


# -------------------------------------------------------------------------------------- kernels


@dataclass
class Kernel:
    """One kernel of the estimate: FLOPs, HBM bytes and the kind that sets its efficiency."""

    part: str
    kind: str
    flops: float
    bytes: float
    label: str = ""

    def seconds(self, dev: Device, eff: Efficiency) -> float:
        compute = self.flops / (dev.bf16_tflops * 1e12 * eff.compute(self.kind)) if self.flops else 0.0
        return max(compute, self.bytes / (dev.hbm_tbs * 1e12 * eff.memory))


def eager_kernels(step: CountedStep) -> List[Kernel]:
    """One kernel per recorded op (views move nothing and are left out)."""
    return [Kernel(r.part, r.kind, r.flops, r.bytes, r.name) for r in step.records if r.kind != "view"]


# Kinds torch.compile (Inductor) fuses: element-wise ops, and LayerNorm forward/backward (a row
# reduction over D it computes in one persistent-reduction kernel with the element-wise work
# around it). Matmuls, convolutions and attention stay library/Triton kernels of their own.
FUSIBLE = ("other", "norm")


def fuse_chains(records: Sequence[OpRecord], live: set) -> List[Kernel]:
    """``torch.compile``'s fusion of element-wise work, as a rule on the recorded op sequence.

    Rule: between two matmuls / convs / attention ops (and within one part and phase), every
    :data:`FUSIBLE` op (element-wise ops and norms; views are free) that reads a tensor written
    by an earlier op of an open chain joins that chain (joining two chains when it reads both);
    any other starts a chain of its own. A chain is one kernel: it
    reads each outside tensor once and writes only the tensors read after the chain (later ops,
    the backward, or alive after the step: gradients, loss). Other ops stay single kernels.
    """
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
        if r.kind not in FUSIBLE:
            close_all()
            kernels.append(Kernel(r.part, r.kind, r.flops, r.bytes, r.name))
            continue
        if (r.part, r.phase, r.sub) != group:
            close_all()
            group = (r.part, r.phase, r.sub)
        keys = {k for k, _ in r.reads}
        hits = [c for c in range(len(chains)) if made[c] & keys]
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


def fused_kernels(step: CountedStep) -> List[Kernel]:
    """The compiled step: chain fusion everywhere, then the fused kernels' analytic parts."""
    replaced = lambda r: r.part in ("attention", "loss") or r.sub == "masked embed"
    kept = [r for r in step.records if not replaced(r)]
    return (fuse_chains(kept, step.live) + masked_embed_kernels(step) + flash_attention_kernels(step)
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
        if k.flops and k.flops / (dev.bf16_tflops * 1e12 * eff.compute(k.kind)) >= sec:
            row["compute_ms"] += 1e3 * sec
    return out


def build_plan(step: CountedStep, eff: Efficiency = Efficiency(), devices: Sequence[Device] = DEVICES,
               measured: Optional[Dict[str, float]] = None, measured_label: str = "") -> Dict[str, Any]:
    """The plan as a JSON-able dict: per device and part, FLOPs, bytes and time, eager and fused."""
    eager = eager_kernels(step) + optimizer_kernels(step)
    fused = fused_kernels(step)
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
        plan["devices"][dev.name] = {
            "peak_bf16_tflops": dev.bf16_tflops, "hbm_tbs": dev.hbm_tbs, "source": dev.source, "parts": parts,
            "eager_ms": eager_ms, "fused_ms": fused_ms,
            "eager_img_per_s": 1e3 * b / eager_ms, "fused_img_per_s": 1e3 * b / fused_ms,
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
                  "img/s.", ""]
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
        "and every other chain of element-wise ops (one part and phase, each op reading the chain's output) "
        "as one kernel reading its inputs once and writing only what is read later; the tokenizer's "
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


# ------------------------------------------------------------------------------- measured (GPU)


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
    return {p: v / 1e3 / steps for p, v in totals.items()}, "CUDA kernels" if cuda else "CPU time"


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
        use = scope or Scope("model", "", True, False)
        if not name.startswith((_RANGE, bs.RANGE_PREFIX)):
            out[part_of(use, kind)[0]] += bs._self_time(ev, cuda)
        for child in ev.cpu_children:
            visit(child, scope, phase)
        if name == f"{_RANGE}model|norm":
            state["after_norm"] = True

    on_cpu = lambda e: getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU
    for ev in sorted((e for e in events if e.cpu_parent is None and on_cpu(e)), key=lambda e: e.time_range.start):
        visit(ev, None, "forward")
    return out


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
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention of the counted (eager) step")
    p.add_argument("--seed", type=int, default=0)
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
                            args.tokenizer, args.amp, args.attn, args.seed)
    return settings, args


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    settings, args = parse_settings(argv)
    measured, label = None, ""
    if args.measure:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--measure --device cuda requested but no CUDA device is available")
        measured, label = measure_parts(settings, device, args.steps)
        label = f"{bs.device_name(torch.device(device))}, {label}"
    plan = build_plan(count_step(settings), measured=measured, measured_label=label)
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
