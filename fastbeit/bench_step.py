"""The whole pre-training step as a benchmark: ours, the reference code's, and timm's.

Every contender runs the same step on data already on the device, so only the computation is
compared: tokenizer encode (no grad, the same tokenizer for all) → ``forward_loss`` → backward →
grad-norm clip → AdamW step. Contenders:

- ``fastbeit``: our model (attention ``auto``, kernels ``auto``), fused AdamW on CUDA;
- ``reference``: the original eager computation (:mod:`fastbeit.reference`), plain AdamW;
- ``timm``: timm's ``Beit`` encoder (SDPA attention) with the MIM head bolted on
  (:class:`TimmBeitMIM`), fused AdamW on CUDA;
- ``fastbeit-compile``, ``timm-compile``: the same under ``torch.compile`` (any name takes a
  ``-compile`` suffix); the forward is :func:`loss_step`, the one pre-training compiles.

:class:`StepOptions` switches the step's optimizations one by one for the ablation table of
``python -m fastbeit.report --ablate``. :func:`profile_breakdown` splits one step's time into
tokenizer / embed / attention / MLP / norms / loss / optimizer with ``torch.profiler``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType

from fastbeit.config import BeitConfig, make_config
from fastbeit.errors import UserError
from fastbeit.layers import trunc_normal_
from fastbeit.masking import MaskingGenerator
from fastbeit.model import BeitForMaskedImageModeling, MIMOutput
from fastbeit.optim import build_adamw, decay_groups
from fastbeit.pretrain import LossModule
from fastbeit.reference import ReferenceBeitForMaskedImageModeling
from fastbeit.tokenizer.dvae import DOWNSAMPLE, DiscreteVAE, DVAEConfig
from fastbeit.tokenizer.infer import DEFAULT_PRECISION, InferenceTokenizer

CONTENDERS = ("fastbeit", "fastbeit-compile", "reference", "timm", "timm-compile")
AMP_DTYPES = {"bf16": torch.bfloat16, "none": None}  # no fp16: it would need a GradScaler in the step
# The original recipe masks 75 of 196 patches in blocks of at least 16; other grids keep the ratio.
MASK_RATIO = 75 / 196
# DALL-E's tokenizer size (its real weights do not matter for speed) and a small CPU stand-in.
DALLE_TOKENIZER = dict(n_hid=256, n_blk_per_group=2)
TINY_TOKENIZER = dict(n_hid=16, n_blk_per_group=1)
WEIGHT_DECAY, LR, CLIP_GRAD = 0.05, 1.5e-3, 3.0


@dataclass
class StepOptions:
    """The step's optimizations, each switchable for the ablation (defaults: ``fastbeit``'s)."""

    tokenizer_fast: bool = True  # the inference form at the default precision; else the eager fp32 module
    fused_adamw: Optional[bool] = None  # None: fused on CUDA
    attn_backend: str = "auto"
    kernels: str = "auto"
    exact_masks: bool = False  # topped-up masks + num_masked: static shapes, no sync in the gather
    host_sync: bool = False  # loss.item() every step, as the original training loop does
    compile: bool = False
    compile_mode: str = "default"  # "reduce-overhead": CUDA graphs (needs static shapes: exact_masks)


def mask_settings(grid: int) -> tuple[int, int]:
    """(target, min block) for a ``grid × grid`` patch grid: 75 and 16 on 14×14."""
    target = max(1, round(MASK_RATIO * grid * grid))
    return target, max(1, min(16, target // 4))


def make_masks(batch: int, grid: int, exact: bool = False, seed: int = 0) -> torch.Tensor:
    """``[B, grid²]`` bool blockwise masks from the faithful generator (topped up with ``exact``).

    Seeded, so every contender of a run sees the same masks.
    """
    target, min_block = mask_settings(grid)
    gen = MaskingGenerator((grid, grid), target, min_num_patches=min_block, mode="exact" if exact else "blockwise")
    rng = random.Random(seed)
    return torch.stack([torch.from_numpy(gen(rng)).flatten().bool() for _ in range(batch)])


def tokenizer_config(grid: int, vocab_size: int, size: str) -> DVAEConfig:
    """An encoder-only dVAE for a ``grid × grid`` id map: ``dalle`` (DALL-E's width) or ``tiny``."""
    widths = {"dalle": DALLE_TOKENIZER, "tiny": TINY_TOKENIZER}
    if size not in widths:
        raise UserError(f"unknown tokenizer size {size!r}; choose from {sorted(widths)}")
    return DVAEConfig(vocab_size=vocab_size, image_size=grid * DOWNSAMPLE, decoder=False, **widths[size])


def resolve_tokenizer_size(size: str, device: torch.device) -> str:
    """``auto``: DALL-E's width on CUDA (the real cost), the tiny one on CPU."""
    return ("dalle" if torch.device(device).type == "cuda" else "tiny") if size == "auto" else size


class TimmBeitMIM(nn.Module):
    """timm's ``Beit`` encoder with BEiT's masked-image-modeling head bolted on.

    patch_embed → mask-token blend → CLS → blocks (shared rel-pos bias, LayerScale) → norm →
    ``lm_head`` on the masked positions → ``F.cross_entropy``. timm's attention uses SDPA when
    ``timm.layers.use_fused_attn()``. Parameter names under ``beit.`` are ours, so our weights load
    with :meth:`load_fastbeit_state`.
    """

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        from timm.models.beit import Beit

        self.cfg = cfg
        self.beit = Beit(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            global_pool="token", embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            qkv_bias=cfg.qkv_bias, mlp_ratio=cfg.mlp_ratio, drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate,
            drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values if cfg.layer_scale else None,
            use_abs_pos_emb=cfg.use_abs_pos_emb, use_rel_pos_bias=cfg.use_rel_pos_bias,
            use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        trunc_normal_(self.mask_token, cfg.init_std)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        trunc_normal_(self.lm_head.weight, cfg.init_std)
        nn.init.zeros_(self.lm_head.bias)

    def no_weight_decay(self) -> set:
        return {"beit.pos_embed", "beit.cls_token"}

    def load_fastbeit_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a :class:`BeitForMaskedImageModeling` ``state_dict`` (same names, minus buffers)."""
        own = {k: v for k, v in state.items() if k.split(".")[0] in ("mask_token", "lm_head")}
        enc = {k: v for k, v in state.items() if k not in own and not k.endswith("relative_position_index")}
        missing, unexpected = self.beit.load_state_dict(enc, strict=False)
        missing = [k for k in missing if not k.endswith(("relative_position_index", "k_bias"))]
        if missing or unexpected:
            raise ValueError(f"weights do not map onto timm's Beit: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(own, strict=False)

    def forward_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, token_ids: torch.Tensor,
        num_masked: Optional[int] = None,
    ) -> MIMOutput:
        b = self.beit
        x = b.patch_embed(images)
        w = bool_masked_pos.unsqueeze(-1).type_as(self.mask_token)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if b.pos_embed is not None:
            x = x + b.pos_embed
        x = b.pos_drop(x)
        rel_pos_bias = b.rel_pos_bias() if b.rel_pos_bias is not None else None
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = b.norm(x)[:, 1:]
        if num_masked is None:  # faithful: boolean gather of a variable count (a host sync)
            hidden, labels = x[bool_masked_pos], token_ids[bool_masked_pos]
        else:  # static shapes: the first num_masked masked positions of each image, in order
            idx = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, descending=True, stable=True)[:, :num_masked]
            hidden = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).flatten(0, 1)
            labels = torch.gather(token_ids, 1, idx).flatten()
        logits = self.lm_head(hidden)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return MIMOutput(loss, acc)


def loss_step(model: nn.Module, compile: bool = False, mode: str = "default") -> nn.Module:
    """The forward a pre-training step runs: ``pretrain``'s :class:`LossModule` (images, masks,
    token ids → loss, accuracy), under ``torch.compile`` when asked. Every contender goes through
    here, so the benchmark's compiled step is the one ``fastbeit-pretrain --compile`` runs: one
    graph (``fullgraph=True``) for fastbeit; timm's boolean gather of the faithful masks breaks its
    graph, as it would for any timm user."""
    module = LossModule(model)
    if not compile:
        return module
    return torch.compile(module, mode=None if mode == "default" else mode,
                         fullgraph=isinstance(model, BeitForMaskedImageModeling))


class _Ranges:
    """``record_function`` ranges opened and closed from module hooks (profiling only)."""

    def __init__(self) -> None:
        self.stack: List[Any] = []

    def open(self, name: str) -> None:
        rf = torch.autograd.profiler.record_function(name)
        rf.__enter__()
        self.stack.append((name, rf))

    def close(self, name: str) -> None:
        if self.stack and self.stack[-1][0] == name:
            self.stack.pop()[1].__exit__(None, None, None)

    def close_all(self) -> None:
        while self.stack:
            self.stack.pop()[1].__exit__(None, None, None)


RANGE_PREFIX = "fb::"
COMPONENTS = ("tokenizer", "embed", "attention", "mlp", "norm", "loss", "optimizer", "other")


@dataclass
class Contender:
    """One contender's model, optimizer and fixed inputs; :meth:`step` runs one training step."""

    name: str
    model: nn.Module
    tokenizer: DiscreteVAE | InferenceTokenizer
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    token_view: torch.Tensor
    masks: torch.Tensor
    amp: str
    options: StepOptions
    info: Dict[str, Any] = field(default_factory=dict)
    _ranges: _Ranges = field(default_factory=_Ranges)
    _hooks: List[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = self.images.device
        target = mask_settings(int(self.masks.shape[1] ** 0.5))[0]
        # fastbeit gathers every mask into `target` padded rows (static shapes, faithful counts); the
        # others gather a variable count unless the masks are topped up to exactly `target`
        fastbeit = isinstance(self.model, BeitForMaskedImageModeling)
        self.num_masked = target if self.options.exact_masks or fastbeit else None
        self.forward = loss_step(self.model, self.options.compile, self.options.compile_mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    def _autocast(self, dtype: Optional[torch.dtype]):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self) -> torch.Tensor:
        """One pre-training step; returns the detached loss without waiting for the device."""
        rf = torch.autograd.profiler.record_function
        with rf(RANGE_PREFIX + "tokenizer"), torch.no_grad():  # at its own precision (fp32: no autocast)
            token_ids = self.tokenizer.encode(self.token_view).flatten(1)
        with self._autocast(AMP_DTYPES[self.amp]):
            loss, _ = self.forward(self.images, self.masks, token_ids, self.num_masked)
        self._ranges.close_all()
        loss.backward()
        with rf(RANGE_PREFIX + "optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.options.host_sync:
            loss.item()
        return loss.detach()

    def instrument(self) -> None:
        """Hook ``record_function`` ranges around embed / attention / MLP / norms / loss for the profiler."""
        root = getattr(self.model, "beit", self.model)
        r, add = self._ranges, self._hooks.append
        pre = lambda name: (lambda *_: r.open(RANGE_PREFIX + name))
        post = lambda name: (lambda *_: r.close(RANGE_PREFIX + name))
        add(root.patch_embed.register_forward_pre_hook(pre("embed")))
        add(root.blocks[0].register_forward_pre_hook(post("embed")))
        for blk in root.blocks:
            add(blk.attn.register_forward_pre_hook(pre("attention")))
            add(blk.attn.register_forward_hook(post("attention")))
            add(blk.mlp.register_forward_pre_hook(pre("mlp")))
            add(blk.mlp.register_forward_hook(post("mlp")))
            for norm in (blk.norm1, blk.norm2):
                add(norm.register_forward_pre_hook(pre("norm")))
                add(norm.register_forward_hook(post("norm")))
        add(root.norm.register_forward_pre_hook(pre("loss")))  # final norm → gather → lm_head → CE

    def remove_instrumentation(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def close(self) -> None:
        """Drop the model and buffers so the next contender starts with free device memory."""
        self.remove_instrumentation()
        for name in ("model", "forward", "optimizer", "tokenizer", "params"):
            setattr(self, name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def parse_contender(name: str) -> tuple[str, bool]:
    """``'timm-compile'`` → ``('timm', True)``; raises :class:`UserError` for unknown names."""
    base, compiled = (name[: -len("-compile")], True) if name.endswith("-compile") else (name, False)
    if base not in ("fastbeit", "reference", "timm"):
        raise UserError(f"unknown contender {name!r}; choose from fastbeit, reference, timm (each may end in -compile)")
    return base, compiled


def build_model(base: str, cfg: BeitConfig) -> nn.Module:
    """The model of a contender: ours, the reference, or timm's Beit with the MIM head."""
    if base == "fastbeit":
        return BeitForMaskedImageModeling(cfg)
    if base == "reference":
        return ReferenceBeitForMaskedImageModeling(cfg.replace(attn_backend="eager", kernels="reference"))
    return TimmBeitMIM(cfg)


def build_contender(
    name: str,
    model_name: str = "beit_base",
    batch: int = 128,
    img_size: int = 224,
    patch_size: int = 16,
    amp: str = "bf16",
    device: str | torch.device = "cuda",
    compile: bool = False,
    options: Optional[StepOptions] = None,
    vocab_size: int = 8192,
    tokenizer_size: str = "auto",
    seed: int = 0,
    depth: Optional[int] = None,
) -> Contender:
    """A ready-to-step contender with random images, a tokenizer view and seeded masks on ``device``.

    ``options`` switches single optimizations (ablation); ``compile`` or a ``-compile`` name wraps
    the forward in ``torch.compile``. The reference contender always runs plain AdamW (as the
    original code). ``tokenizer_size`` ``auto`` is DALL-E's width on CUDA, a tiny one on CPU;
    ``depth`` overrides the preset's (small CPU runs).
    """
    base, compiled = parse_contender(name)
    if amp not in AMP_DTYPES:
        raise UserError(f"unknown amp {amp!r}; choose from {sorted(AMP_DTYPES)}")
    if batch <= 0:
        raise UserError(f"batch must be positive, got {batch}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("a CUDA device was requested but none is available")
    opts = dataclasses.replace(options or StepOptions())
    opts.compile = opts.compile or compile or compiled
    if base == "reference":
        opts.fused_adamw = False
    torch.manual_seed(seed)
    cfg = make_config(model_name, img_size=img_size, patch_size=patch_size, vocab_size=vocab_size, depth=depth,
                      attn_backend=opts.attn_backend, kernels=opts.kernels)
    with device:  # parameters born on the device: the ±1σ truncated-normal init is slow on a CPU
        model = build_model(base, cfg).train()
    fused = opts.fused_adamw if opts.fused_adamw is not None else device.type == "cuda"
    optimizer = build_adamw(decay_groups(model, WEIGHT_DECAY), LR, fused=fused)
    grid = cfg.grid[0]
    tokenizer_size = resolve_tokenizer_size(tokenizer_size, device)
    tok_cfg = tokenizer_config(grid, vocab_size, tokenizer_size)
    with device:
        tokenizer = DiscreteVAE(tok_cfg).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
    token_view = (0.1 + 0.8 * torch.rand(batch, 3, grid * DOWNSAMPLE, grid * DOWNSAMPLE, generator=gen)).to(device)
    if opts.tokenizer_fast:
        tokenizer = InferenceTokenizer(tokenizer, DEFAULT_PRECISION)
        if tokenizer.channels_last:
            token_view = token_view.contiguous(memory_format=torch.channels_last)
    masks = make_masks(batch, grid, exact=opts.exact_masks, seed=seed).to(device)
    if base == "fastbeit":
        attn, kernels = resolved_backends(cfg, device, AMP_DTYPES[amp] or torch.float32)
    else:
        attn, kernels = ("eager" if base == "reference" else "sdpa (timm)"), "-"
    info = dict(
        contender=name, model=model_name, depth=cfg.depth, batch=batch, img_size=img_size,
        patch_size=patch_size, amp=amp, device=device_name(device), fused_adamw=fused, attn_backend=attn,
        kernels=kernels, compile=opts.compile, exact_masks=opts.exact_masks, host_sync=opts.host_sync,
        compile_mode=opts.compile_mode if opts.compile else None,
        tokenizer=f"{tokenizer_size} (n_hid {tok_cfg.n_hid}, vocab {vocab_size})",
        tokenizer_size=tokenizer_size, vocab_size=vocab_size, masked_per_image=float(masks.sum()) / batch,
    )
    return Contender(name, model, tokenizer, optimizer, images, token_view, masks, amp, opts, info)


def resolved_backends(cfg: BeitConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """What ``auto`` picks here for attention and the fused kernels, e.g. ``('auto→triton', 'auto→triton')``."""
    from fastbeit.attention import resolve_backend
    from fastbeit.kernels import use_triton

    n = cfg.num_patches + 1
    q = torch.empty(1, cfg.num_heads, n, cfg.head_dim, device=device, dtype=dtype)
    bias = torch.empty(cfg.num_heads, n, n, device=device) if cfg.use_shared_rel_pos_bias else None
    try:
        attn = resolve_backend(cfg.attn_backend, q, bias, 0.0)
    except UserError:
        attn = "unavailable"
    kernels = cfg.kernels
    if kernels == "auto":
        kernels = "triton" if use_triton(q) else "reference"
    name = lambda asked, got: f"auto→{got}" if asked == "auto" else got
    return name(cfg.attn_backend, attn), name(cfg.kernels, kernels)


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name, or ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(contender: Contender, steps: int) -> torch.Tensor:
    """``steps`` steps, then wait for the device: the unit a timer can bracket."""
    loss = None
    for _ in range(steps):
        loss = contender.step()
    synchronize(contender.device)
    return loss


def measure(contender: Contender, warmup: int = 3, iters: int = 10) -> Dict[str, Any]:
    """Throughput of ``iters`` steps after ``warmup`` (CUDA events on GPU, perf_counter on CPU).

    ``compile_s`` is the warm-up's wall time beyond ``warmup`` steady steps: compilation and
    autotuning, counted once per contender (``None`` without warm-up). Peak memory counts from
    the first warm-up step (optimizer state included); ``None`` on CPU.
    """
    if iters <= 0 or warmup < 0:
        raise UserError(f"iters must be positive and warmup non-negative (got {iters}, {warmup})")
    dev = contender.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    run_steps(contender, warmup)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = run_steps(contender, iters)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        t0 = time.perf_counter()
        loss = run_steps(contender, iters)
        seconds = time.perf_counter() - t0
        peak = None
    return {
        **contender.info,
        "img_per_s": contender.batch * iters / seconds,
        "step_ms": 1e3 * seconds / iters,
        "warmup_s": warmup_s,
        # the warm-up's excess over as many timed steps: torch.compile, Triton autotuning, first-call set-up
        "compile_s": max(0.0, warmup_s - warmup * seconds / iters) if warmup else None,
        "peak_mem_bytes": peak,
        "warmup": warmup,
        "iters": iters,
        "loss": float(loss),
    }


def _self_time(event, cuda: bool) -> float:
    """An event's own time in µs: device time of its kernels on CUDA, CPU time otherwise."""
    if cuda:  # the device name when torch has it: reading the deprecated cuda one warns (and sums twice)
        if getattr(type(event), "self_device_time_total", None) is not None:
            return float(event.self_device_time_total)
        return float(getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def _attribute(events, cuda: bool) -> Dict[str, Dict[str, float]]:
    """Sum self times per (component, phase).

    Forward ops take the innermost ``fb::`` range around them; backward ops
    (``autograd::engine::evaluate_function: XBackward``) take the component of the forward op
    with the same autograd sequence number.
    """
    seq_owner: Dict[int, str] = {}
    out: Dict[str, Dict[str, float]] = {c: {"forward": 0.0, "backward": 0.0} for c in COMPONENTS}

    def visit(ev, comp: str, phase: str) -> None:
        if ev.name.startswith(RANGE_PREFIX):
            comp = ev.name[len(RANGE_PREFIX):]
        elif ev.name.startswith("autograd::engine::evaluate_function:"):
            phase, comp = "backward", seq_owner.get(ev.sequence_nr, "other")
        elif phase == "forward" and ev.sequence_nr >= 0:
            seq_owner[ev.sequence_nr] = comp  # ops run in time order: the node's creator writes last
        comp = comp if comp in out else "other"
        out[comp][phase] += _self_time(ev, cuda)
        for child in ev.cpu_children:
            visit(child, comp, phase)

    # CPU-side events only: their kernels carry the device time. Device-side copies of the
    # ``fb::`` ranges (GPU user annotations) would count those spans a second time.
    on_cpu = lambda e: getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU
    roots = sorted((e for e in events if e.cpu_parent is None and on_cpu(e)), key=lambda e: e.time_range.start)
    for root in roots:
        visit(root, "other", "forward")
    return out


def profile_breakdown(contender: Contender, steps: int = 3, warmup: int = 1) -> Dict[str, Any]:
    """Per-component time of one step (mean over ``steps``) from ``torch.profiler``.

    Returns ``{"components": {name: {"forward": ms, "backward": ms}}, "profiled_ms": total,
    "timer": "cuda kernels" | "cpu"}``; on CUDA the times are kernel time on the device.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = contender.device.type == "cuda"
    run_steps(contender, warmup)
    contender.instrument()
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            run_steps(contender, steps)
    finally:
        contender.remove_instrumentation()
    parts = _attribute(prof.events(), cuda)
    comps = {c: {k: v / 1e3 / steps for k, v in ph.items()} for c, ph in parts.items()}
    total = sum(v["forward"] + v["backward"] for v in comps.values())
    return {"components": comps, "profiled_ms": total, "timer": "cuda kernels" if cuda else "cpu"}


def sweep(
    builders: Dict[str, Callable[[], Contender]], warmup: int, iters: int,
    on_row: Optional[Callable[[str, Dict[str, Any]], None]] = None,
    after: Optional[Callable[[str, Contender], None]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Measure contenders one at a time, each freed before the next.

    A contender that fails (an unavailable backend, out of memory, a compiler error) becomes a
    row with ``skipped`` set to the reason, so one failure does not lose a GPU session's other
    figures. ``on_row`` sees each row as it is measured; ``after`` gets the warm contender.
    """
    rows: Dict[str, Dict[str, Any]] = {}
    for name, build in builders.items():
        contender = None
        try:
            contender = build()
            rows[name] = measure(contender, warmup, iters)
        except Exception as exc:  # recorded in the row and printed for the log
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:200]
            rows[name] = {"contender": name, "skipped": f"{type(exc).__name__}: {first_line}"}
        try:
            if on_row is not None:
                on_row(name, rows[name])
            if after is not None and contender is not None and "skipped" not in rows[name]:
                after(name, contender)
        finally:
            if contender is not None:
                contender.close()
    return rows
