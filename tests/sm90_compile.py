"""Compile the Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

The interpreter tests never compile, so type errors, unsupported ops or tiles that need more shared
memory than sm_90 has only show on a GPU. This script builds kernels with ``triton.compile`` and
Triton's bundled ptxas (no GPU needed) and fails if one does not compile or asks for more shared
memory than a block can have. The tests run it in a subprocess (``TRITON_INTERPRET=0``, their own
cache dir); by hand::

    TRITON_INTERPRET=0 TRITON_CACHE_DIR=$(mktemp -d) python tests/sm90_compile.py gathered_ce attention_all

It prints one line per compiled kernel: case, tiles, shared memory bytes, registers and spill bytes
(from the ptxas log); it exits with ``SKIP: <reason>`` on stderr when this Triton cannot compile
offline.

Groups ``gathered_ce``, ``masked_embed``, ``block_mask``, ``token_argmax`` and ``attention_all`` run the modules'
public functions (forward and backward) at BEiT-Base sizes with every kernel swapped for a recorder,
then compile each recorded launch as ``JITFunction.run`` would on the GPU: same dtypes and
constexprs, same specialization on the argument values (ints equal to 1 become constants, 16-byte
aligned pointers and ints divisible by 16 are marked so; this decides vectorization and pipelining,
hence shared memory and registers), every config of an autotuned kernel. Each of the module's
kernels must be compiled at least once. Group ``attention`` compiles hand-listed signatures through
:func:`source` (pointer dtypes only, no value specialization).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from typing import Callable, Iterator

SM90_MAX_SHARED = 232448  # bytes of shared memory one block can opt into on sm_90 (227 KiB)
HERE = os.path.abspath(__file__)
# BEiT-Base: 14 x 14 patches, 75 masked, width 768, 8192 visual tokens, 12 heads of 64.
B, N, D, V, MASKED, HEADS = 64, 196, 768, 8192, 75, 12


def source(kernel, pointers: dict, constants: dict):
    """An ASTSource for ``kernel`` (or an autotuner's kernel): pointer args get the dtypes in
    ``pointers``, args named ``*scale`` fp32, every other runtime arg i32 (no value specialization)."""
    from triton.compiler import ASTSource

    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap the autotuner
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
    return ASTSource(fn, signature, constants)


def launch_sources(kernel, args: tuple, kwargs: dict, target) -> list:
    """(ASTSource, options, config) for each compile ``kernel[grid](*args, **kwargs)`` triggers on
    ``target``, built by ``JITFunction.run``'s own binder and ``_pack_args``; one per autotune config."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    tuned = hasattr(kernel, "configs")
    fn = kernel.fn if tuned else kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    out = []
    for config in kernel.configs if tuned else [None]:
        kw = dict(kwargs, **(config.all_kwargs() if config is not None else {}))
        kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        out.append((ASTSource(fn, signature, constexprs, attrs), options.__dict__, config))
    return out


# ------------------------------------------------------------------------------ recorded launches


def _kernel_names(module) -> list:
    """The module's own @triton.jit kernels: the JIT functions it defines that none of them calls
    (those are device functions)."""
    jitted = {n: v.fn if hasattr(v, "configs") else v for n, v in vars(module).items()
              if type(v).__name__ in ("JITFunction", "Autotuner")}
    own = {n: f.src for n, f in jitted.items() if f.fn.__module__ == module.__name__}
    return [n for n in own if not any(re.search(rf"\b{n}\(", src) for m, src in own.items() if m != n)]


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` only records."""

    def __init__(self, kernel, case: str, launches: list) -> None:
        self.kernel, self.case, self.launches = kernel, case, launches

    def __getitem__(self, grid) -> Callable:
        return lambda *args, **kwargs: self.launches.append((self.kernel, self.case, args, kwargs))


@contextlib.contextmanager
def _recording(module, launches: list, case: str) -> Iterator[None]:
    """The module's kernels record their launches; its ``use_triton`` says yes on the CPU."""
    names = _kernel_names(module)
    saved = {n: getattr(module, n) for n in names + ["use_triton"]}
    for n in names:
        setattr(module, n, _Recorder(saved[n], case, launches))
    module.use_triton = lambda tensor: True
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")


def _gathered_ce(launches: list):
    """fwd + bwd of ``gathered_cross_entropy`` as the model calls it (``hidden = x[:, 1:]``, a fixed
    count of masked patches, lm_head weight and bias), per dtype and autocast setting."""
    import torch

    from fastbeit.kernels import gathered_ce as mod

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [  # tensors' dtype, autocast dtype, allow_tf32, bias
        (bf16, None, False, True), (bf16, None, False, False),
        (f16, None, False, True), (f16, None, False, False),
        (f32, None, False, True), (f32, None, False, False),  # IEEE fp32 dot: torch's default
        (f32, None, True, True),  # TF32 when torch.backends.cuda.matmul.allow_tf32
        (f32, bf16, False, True), (f32, f16, False, True),  # fp32 weights under --amp bf16 / fp16
    ]  # fmt: skip
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i in range(B):
        mask[i, torch.randperm(N)[:MASKED]] = True
    targets = torch.randint(0, V, (B, N))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    for dtype, amp, tf32, has_bias in cases:
        case = _short(dtype) + (f"+amp-{_short(amp)}" if amp else "/tf32" if tf32 else "/ieee" if dtype == f32 else "")
        case += "" if has_bias else ",nobias"
        x = torch.randn(B, N + 1, D, dtype=dtype, requires_grad=True)
        weight = torch.randn(V, D, dtype=dtype, requires_grad=True)
        bias = torch.randn(V, dtype=dtype, requires_grad=True) if has_bias else None
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            with _recording(mod, launches, case):
                with torch.autocast("cpu", dtype=amp or bf16, enabled=amp is not None):
                    loss, _ = mod.gathered_cross_entropy(x[:, 1:], mask, weight, bias, targets, MASKED)
                loss.backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return mod


def _masked_embed(launches: list):
    """fwd + bwd of ``masked_embed`` (bool mask; with pos_embed, and without as in BEiT with only
    relative position bias), per dtype; under autocast the patches are 16-bit, the parameters fp32."""
    import torch

    from fastbeit.kernels import masked_embed as mod

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [  # patch dtype, parameter dtype, pos_embed
        (f32, f32, True), (f32, f32, False),
        (bf16, bf16, True), (bf16, bf16, False),
        (f16, f16, True),
        (bf16, f32, True), (bf16, f32, False), (f16, f32, True),
    ]  # fmt: skip
    mask = torch.rand(B, N) < MASKED / N
    for patch_dtype, param_dtype, has_pos in cases:
        case = f"patch {_short(patch_dtype)}, params {_short(param_dtype)}{'' if has_pos else ',nopos'}"
        patches = torch.randn(B, N, D, dtype=patch_dtype, requires_grad=True)
        mask_token, cls_token = (torch.randn(1, 1, D, dtype=param_dtype, requires_grad=True) for _ in range(2))
        pos = torch.randn(1, N + 1, D, dtype=param_dtype, requires_grad=True) if has_pos else None
        with _recording(mod, launches, case):
            out = mod.masked_embed(patches, mask, mask_token, cls_token, pos)
            out.backward(torch.randn_like(out))
    return mod


def _block_mask(launches: list):
    """``sample_block_masks`` on a 14 x 14 grid, 75 patches, each mode; batch, seed and offset
    values of each specialization class (divisible by 16, equal to 1, other; a seed past 2**31)."""
    import torch

    from fastbeit.kernels import block_mask as mod

    draws = [(B, 0, 0), (B, 1, 1), (30, 2**40 + 3, 123457)]  # batch, seed, offset (= step)
    for mode in ("blockwise", "exact", "random"):
        for batch, seed, offset in draws:
            with _recording(mod, launches, f"{mode},B={batch},seed={seed},offset={offset}"):
                mod.sample_block_masks(batch, (14, 14), MASKED, 16, mode=mode, seed=seed, offset=offset,
                                       device=torch.device("cpu"))
    return mod


def _attention_all(launches: list):
    """fwd + bwd of the model's ``flash_attention_qkv`` operator (a packed BEiT-Base qkv, a shared fp32
    [H, N+1, N+1] bias needing grad, rows at the aligned stride) and of ``flash_attention`` (q, k, v
    views), with every tile candidate in turn: bf16 (--amp bf16) and fp32 at torch's default matmul
    precision (3xTF32). Batch 4: 2 images per d(bias) chunk, as on the GPU (where the chunk count
    depends on the SM count), not a specialized 1."""
    import torch

    from fastbeit.kernels import attention as mod

    batch, n, head_dim = 4, N + 1, D // HEADS
    pinned = mod._launch_tile
    for tile in range(4):
        mod._launch_tile = lambda name, i=tile: dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
                                                         mod.TILE_CANDIDATES[name][i]))
        try:
            for dtype in (torch.bfloat16, torch.float32):
                qkv = torch.randn(batch, n, 3 * D, dtype=dtype, requires_grad=True)
                row = mod.aligned_row_stride(n)
                bias = torch.randn(HEADS, n, row)[..., :n].requires_grad_(True)
                with _recording(mod, launches, f"{_short(dtype)}, fp32 bias, qkv op"):
                    out = mod._qkv_fwd_op(qkv, bias, HEADS, head_dim**-0.5)[0]
                    out.backward(torch.randn_like(out))
                q, k, v = qkv.detach().view(batch, n, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                with _recording(mod, launches, f"{_short(dtype)}, fp32 bias"):
                    out = mod.flash_attention(q, k, v, bias, head_dim**-0.5)
                    out.backward(torch.randn_like(out))
        finally:
            mod._launch_tile = pinned
    return mod


def _token_argmax(launches: list):
    """The DALL-E tokenizer's fused head at batch 64: channels-last ``[64·196, 2048]`` features,
    8192 codes; bf16 (``--tokenizer_precision bf16``), fp32 as TF32 (``tf32``) and IEEE (``fp32``)."""
    import torch

    from fastbeit.kernels import token_argmax as mod

    C = 2048
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for dtype, mode in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
            matmul.fp32_precision = mode
            feats = torch.randn(B, 14, 14, C, dtype=dtype).view(-1, C)
            weight, bias = torch.randn(V, C, dtype=dtype), torch.randn(V)
            with _recording(mod, launches, f"{_short(dtype)}, fp32 math {mode}"):
                mod.token_argmax(feats, weight, bias, relu=True, impl="triton")
    finally:
        matmul.fp32_precision = saved
    return mod


RECORDED = {"gathered_ce": _gathered_ce, "masked_embed": _masked_embed, "block_mask": _block_mask,
            "attention_all": _attention_all, "token_argmax": _token_argmax}


# ------------------------------------------------------------------------------ hand-listed jobs


def _attention_jobs() -> list:
    """(case, ASTSource, options, config): the attention kernels for bf16 q, k, v and an fp32 bias,
    the pinned tile of each."""
    import triton

    import fastbeit.kernels.attention as A

    pinned = {name: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
              for name, (m, n, w, s) in ((k, t[0]) for k, t in A.TILE_CANDIDATES.items())}

    bf, f32 = "bf16", "fp32"
    common = dict(UPCAST=False, DOT_PREC="tf32", BLOCK_D=64)
    jobs = [
        (A._attn_fwd_kernel, dict(Q=bf, K=bf, V=bf, BIAS=f32, OUT=bf, LSE=f32), dict(HAS_BIAS=True), pinned["fwd"]),
        (A._attn_bwd_delta_kernel, dict(OUT=bf, DO=bf, DELTA=f32), dict(BLOCK_M=64, BLOCK_D=64), None),
        (A._attn_bwd_dkdv_kernel,
         dict(Q=bf, K=bf, V=bf, BIAS=f32, DO=bf, LSE=f32, DELTA=f32, DK=bf, DV=bf, DB=f32),
         dict(HAS_BIAS=True, HAS_DBIAS=True, ACC_DBIAS=True), pinned["dkdv"]),
        (A._attn_bwd_dq_kernel, dict(Q=bf, K=bf, V=bf, BIAS=f32, DO=bf, LSE=f32, DELTA=f32, DQ=bf),
         dict(HAS_BIAS=True), pinned["dq"]),
    ]  # fmt: skip
    out = []
    for kernel, pointers, flags, config in jobs:
        constants = dict(flags) if config is None else dict(common, **flags, **config.kwargs)
        options = {} if config is None else {"num_warps": config.num_warps, "num_stages": config.num_stages}
        out.append(("bf16, fp32 bias, unspecialized", source(kernel, pointers, constants), options, config))
    return out


GROUPS = ("attention", *RECORDED)


# ------------------------------------------------------------------------------ compile and report


def _jobs(group: str, target) -> tuple[list, set]:
    """(case, ASTSource, options, config) for ``group``, each distinct compile once (the cases that
    share it joined by ' | '), and the names of the kernels that must be among them."""
    if group == "attention":
        return _attention_jobs(), set()
    launches: list = []
    module = RECORDED[group](launches)
    seen: dict = {}
    for kernel, case, args, kwargs in launches:
        for src, options, config in launch_sources(kernel, args, kwargs, target):
            key = (src.fn.__name__, repr(src.signature), repr(src.constants), repr(src.attrs),
                   repr(sorted(options.items())))
            if key not in seen:
                seen[key] = ([], src, options, config)
            if case not in seen[key][0]:
                seen[key][0].append(case)
    jobs = [(" | ".join(cases), src, options, config) for cases, src, options, config in seen.values()]
    return jobs, set(_kernel_names(module))


def _ptxas_numbers(log: str) -> str:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return f"regs={regs.group(1) if regs else '?'} spills={'/'.join(spills.groups()) if spills else '?'}"


def main(groups: list) -> int:
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v: registers and spills
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        if not hasattr(JITFunction, "_pack_args"):
            raise ImportError("JITFunction._pack_args is gone")
        triton.knobs.nvidia.ptxas.path  # noqa: B018  (raises when there is no ptxas)
    except Exception as exc:
        sys.exit(f"SKIP: this Triton cannot compile for sm_90 offline here ({type(exc).__name__}: {exc})")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("error: run with TRITON_INTERPRET=0 (the kernels must be JIT functions, not interpreted)")
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, sm_90", flush=True)
    failures = []
    for group in groups:
        jobs, expected = _jobs(group, target)
        missing = expected - {src.fn.__name__ for _, src, _, _ in jobs}
        if missing:
            failures.append(f"{group}: no case launches {sorted(missing)}")
        for case, src, options, config in jobs:
            tiles = f" {config.kwargs} warps={config.num_warps} stages={config.num_stages}" if config else ""
            label = f"{group}.{src.fn.__name__} [{case}]{tiles}"
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(src, target=target, options=options)
            except Exception as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"FAIL {label}", flush=True)
                continue
            shared = compiled.metadata.shared
            print(f"OK {label} shared={shared} {_ptxas_numbers(log.getvalue())} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if shared > SM90_MAX_SHARED:
                failures.append(f"{label}: needs {shared} B of shared memory, a block on sm_90 gets {SM90_MAX_SHARED}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


def run_in_subprocess(tmp_path, *groups: str) -> list:
    """(pytest side) Run this script for ``groups`` with its own Triton cache in ``tmp_path``; skip
    when it says ``SKIP:``, fail on any error. Returns the ``OK`` lines."""
    import subprocess

    import pytest

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, HERE, *groups], env=env, capture_output=True, text=True)
    if run.returncode != 0 and "SKIP:" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return [line for line in run.stdout.splitlines() if line.startswith("OK ")]


if __name__ == "__main__":
    if not sys.argv[1:] or any(g not in GROUPS for g in sys.argv[1:]):
        sys.exit(f"usage: {sys.argv[0]} GROUP... (groups: {', '.join(GROUPS)})")
    sys.exit(main(sys.argv[1:]))
