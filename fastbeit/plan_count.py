"""Count a pre-training step's ops without running it: every aten op of the real step at full
size on fake tensors, with its FLOPs, the bytes it moves and the part of the step it belongs to.

The real step (tokenizer forward, ``forward_loss``, backward) runs on fake tensors (meta storage:
no memory, no arithmetic) under CPU autocast bf16, which casts every op this step runs as CUDA's
autocast does (norms and softmax already get float32 inputs). :class:`StepRecorder` records every
aten op with its FLOPs (``torch.utils.flop_counter``'s formulas: matmuls, convs and attention
only, as :mod:`fastbeit.flops`) and the bytes it moves (inputs read + outputs written, each tensor
counted by the elements its strides reach; views move nothing). Each op belongs to a part of the
step by its module scope (backward ops: the scope of the forward op that made their autograd
node) and its kind (:func:`part_of`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from fastbeit import bench_step as bs
from fastbeit.config import make_config
from fastbeit.flops import step_flops

PARTS = ("tokenizer", "patch embed", "attention", "matmuls", "norm & elementwise", "loss", "optimizer")


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
    kind: str  # see _op_kind
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


def _namespace(func) -> str:
    return str(func).split(".")[0].split("::")[0]


def _op_kind(func) -> str:
    """matmul | conv | bmm | attention | norm | view | custom (another library's op: a kernel of its
    own, never fused by the compile estimate) | other (element-wise and reductions)."""
    packet = getattr(func, "_overloadpacket", None)
    name = packet.__name__ if packet is not None else str(func)
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
    if packet in flop_registry:
        return "matmul"
    return "other" if _namespace(func) in ("aten", "prim", "prims") else "custom"


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
    if _namespace(func) not in ("aten", "prim", "prims") and str(packet) not in warned:
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
    tokenizer_precision: str = "tf32"  # the step's default (fastbeit.tokenizer.infer.DEFAULT_PRECISION)


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
            tok_amp = torch.bfloat16 if s.tokenizer_precision == "bf16" else None  # tf32/fp32: fp32 tensors
            with recorder.region_of("tokenizer"), torch.no_grad(), autocast(tok_amp):
                ids = tokenizer.encode(view).flatten(1)
            with autocast(amp):
                out = model.forward_loss(images, fake_masks, ids, bs.mask_settings(grid)[0])  # padded rows
            out.loss.backward()
            live = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
            live |= {out.loss.untyped_storage()._cdata, out.mlm_acc.untyped_storage()._cdata}
    finally:
        for h in handles:
            h.remove()
    per_image = step_flops(cfg, tok_cfg, masked_total / s.batch).training
    return CountedStep(settings, recorder.records, live, num_params, masked_total, dict(recorder.host_syncs),
                       per_image, time.perf_counter() - t0)
