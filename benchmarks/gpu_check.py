"""Compiled Triton kernels on a real GPU against float64 oracles: the check a GPU session runs first.

    TRITON_INTERPRET=0 python benchmarks/gpu_check.py [--json OUT.json]

The test suite runs the kernels in Triton's CPU interpreter; this runs the compiled kernels on CUDA
at odd and at BEiT-Base sizes, on fresh random inputs, and prints one row per output: the relative
error ‖out − oracle‖ / ‖oracle‖ against a float64 computation on the same (rounded) inputs, and the
bound it must stay under (float32 ~1e-4 with TF32-free math, 16-bit operands ~1e-2). NaN never
passes. The masked-token embedding must match its reference bit for bit; the mask sampler must
draw the CPU generator's distribution; the whole step must match the reference model's under the
same precision, gradient by gradient. Exits 1 when a row fails: the run script records that and
reports it; it does not switch the later stages to other code paths.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastbeit.errors import sigterm_as_interrupt

BOUND = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ROWS: List[Dict[str, object]] = []
DEVICE = "cuda"  # "cpu" with TRITON_INTERPRET=1 checks this script itself (--device cpu --quick)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def record(check: str, case: str, output: str, value: float, bound: float, kind: str = "rel err") -> None:
    ok = math.isfinite(value) and value <= bound
    ROWS.append(dict(check=check, case=case, output=output, kind=kind, value=value, bound=bound, ok=ok))


def guarded(check: str, case: str, fn: Callable[[], None]) -> None:
    """Run one case; an exception (a compile error, say) is a failed row, not the end of the run."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a row
        ROWS.append(dict(check=check, case=case, output="exception", kind=type(exc).__name__,
                         value=float("nan"), bound=0.0, ok=False, error=str(exc)[-2000:]))


DBIAS_MAX_ABS = 1e-5  # fp32 (3xTF32 dots, fp32 accumulation): far below any 16-bit rounding


def images_per_program(B: int, H: int, N: int) -> str:
    """How many images one shared-bias gradient program sums here (read off the kernel's chunking)."""
    try:
        from fastbeit.kernels.attention import _dbias_chunks

        return str(math.ceil(B / _dbias_chunks(B, math.ceil(N / 64), H, torch.device(DEVICE))))
    except Exception:  # a private helper: the row's value does not depend on it
        return "?"


def check_attention(B: int, H: int, N: int, d: int, dtype: torch.dtype, bias_kind: str) -> None:
    from fastbeit.kernels.attention import flash_attention

    case = f"B{B} H{H} N{N} d{d} {str(dtype)[6:]} bias={bias_kind}"
    q, k, v = (torch.randn(B, H, N, d, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(3))
    shape = {"none": None, "shared": (H, N, N), "per-image": (B, H, N, N)}[bias_kind]
    bias = None if shape is None else torch.randn(shape, device=DEVICE, dtype=torch.float32).requires_grad_()
    grad_out = torch.randn(B, H, N, d, device=DEVICE, dtype=dtype)
    out = flash_attention(q, k, v, bias)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    sync()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    scores = q64 @ k64.transpose(-2, -1) * d ** -0.5 + (0 if b64 is None else b64)
    want = torch.softmax(scores, -1) @ v64
    inputs64 = [q64, k64, v64] + ([b64] if b64 is not None else [])
    want_grads = torch.autograd.grad(want, inputs64, grad_out.double())
    bound = BOUND[dtype]
    record("attention", case, "out", rel_err(out, want), bound)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
        record("attention", case, name, rel_err(g, w), bound)
    if bias_kind == "shared" and dtype == torch.float32:
        # The batch-reduced gradient, element by element: a program sums several images' dS into a
        # tile it owns, so a lost or doubled image shows here even where the norm hides it.
        err = float((grads[3].double() - want_grads[3]).abs().max() / want_grads[3].abs().max())
        record("attention", case, f"dbias max abs ({images_per_program(B, H, N)} img/program)", err,
               DBIAS_MAX_ABS, "max abs err / max |oracle|")


def check_gathered_ce(B: int, N: int, D: int, V: int, dtype: torch.dtype, num_masked: Optional[int]) -> None:
    from fastbeit.kernels.gathered_ce import gathered_cross_entropy

    case = f"B{B} N{N} D{D} V{V} {str(dtype)[6:]} " + ("variable" if num_masked is None else f"exact {num_masked}")
    x = torch.randn(B, N + 1, D, device=DEVICE).to(dtype).requires_grad_()
    if num_masked is None:
        mask = torch.rand(B, N, device=DEVICE) < 0.4
    else:
        mask = torch.rand(B, N, device=DEVICE).argsort(1).argsort(1) < num_masked
    weight = (torch.randn(V, D, device=DEVICE) * D ** -0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, device=DEVICE) * 0.2).to(dtype).requires_grad_()
    with torch.no_grad():
        best = (x[:, 1:].float() @ weight.float().T).argmax(-1)
    targets = torch.where(torch.rand(B, N, device=DEVICE) < 0.5, best, torch.randint(0, V, (B, N), device=DEVICE))
    loss, acc = gathered_cross_entropy(x[:, 1:], mask, weight, bias, targets, num_masked)
    grads = torch.autograd.grad(loss, [x, weight, bias])
    sync()

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    logits = F.linear(x64[:, 1:][mask], w64, b64)
    want = F.cross_entropy(logits, targets[mask])
    want_acc = (logits.argmax(-1) == targets[mask]).double().mean()
    want_grads = torch.autograd.grad(want, [x64, w64, b64])
    bound = BOUND[dtype] / 10  # a mean over many rows: far tighter than the per-element bound
    record("gathered CE", case, "loss", abs(loss.item() - want.item()) / want.item(), bound)
    # 16-bit logits may flip a near-tie: allow 1 % of the rows to disagree.
    record("gathered CE", case, "accuracy", abs(acc.item() - want_acc.item()), 0.0 if dtype == torch.float32 else 1e-2,
           "abs diff")
    for name, g, w in zip(("dhidden", "dweight", "dbias"), grads, want_grads):
        record("gathered CE", case, name, rel_err(g, w), BOUND[dtype])


def check_token_argmax(M: int, C: int, V: int, dtype: torch.dtype) -> None:
    """The fused tokenizer head: each id's float64 logit (same rounded inputs) must be the row's
    maximum up to float32 rounding of the sum (a near-tie may go either way, nothing more)."""
    from fastbeit.kernels.token_argmax import token_argmax

    x = torch.randn(M, C, device=DEVICE).to(dtype)
    weight = (torch.randn(V, C, device=DEVICE) * C ** -0.5).to(dtype)
    bias = torch.randn(V, device=DEVICE) * 0.1
    ids = token_argmax(x, weight, bias, relu=True, impl="triton")
    sync()
    logits = F.linear(torch.relu(x).double(), weight.double(), bias.double())
    gap = logits.max(-1).values - logits.gather(1, ids[:, None]).squeeze(1)
    tol = 1e-5 * logits.abs().max(-1).values + 1e-6
    record("token argmax", f"M{M} C{C} V{V} {str(dtype)[6:]}", "ids off the max", float((gap > tol).float().mean()),
           0.0, "fraction")


def check_masked_embed(B: int, N: int, D: int, dtype: torch.dtype) -> None:
    from fastbeit.kernels.masked_embed import masked_embed, masked_embed_reference

    case = f"B{B} N{N} D{D} {str(dtype)[6:]}"

    def inputs():
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen).to(dtype).requires_grad_()  # noqa: E731
        mask = torch.rand(B, N, device=DEVICE, generator=gen) < 0.4
        return rand(B, N, D), mask, rand(1, 1, D), rand(1, 1, D), rand(1, N + 1, D)

    grad = torch.randn(B, N + 1, D, device=DEVICE).to(dtype)
    results = []
    for fn in (masked_embed, masked_embed_reference):
        patch, mask, mask_token, cls_token, pos = inputs()
        out = fn(patch, mask, mask_token, cls_token, pos)
        results.append((out, torch.autograd.grad(out, [patch, mask_token, cls_token, pos], grad)))
    (out, grads), (ref, ref_grads) = results
    sync()
    record("masked embed", case, "out (bits)", float((out != ref).sum()), 0.0, "differing elements")
    record("masked embed", case, "dpatch (bits)", float((grads[0] != ref_grads[0]).sum()), 0.0, "differing elements")
    for name, g, w in zip(("dmask_token", "dcls", "dpos"), grads[1:], ref_grads[1:]):
        record("masked embed", case, name, rel_err(g, w), BOUND[dtype] if dtype != torch.float32 else 1e-5)


def check_block_masks(batch: int) -> None:
    import random

    from fastbeit.kernels.block_mask import sample_block_masks
    from fastbeit.masking import MaskingGenerator

    case = f"{batch} masks, 14x14, 75 patches, min block 16"
    gpu = sample_block_masks(batch, seed=3, device=DEVICE)
    again = sample_block_masks(batch, seed=3, device=DEVICE)
    other = sample_block_masks(batch, seed=3, offset=batch, device=DEVICE)
    gen, rng = MaskingGenerator(14, 75, min_num_patches=16), random.Random(0)
    cpu = torch.stack([torch.from_numpy(gen(rng)).flatten() for _ in range(batch)]).bool()
    counts, cpu_counts = gpu.sum(1).double().cpu(), cpu.sum(1).double()
    record("block masks", case, "same seed, same masks", float((gpu != again).sum()), 0.0, "differing elements")
    record("block masks", case, "next offset differs", float(torch.equal(gpu, other)), 0.0, "identical (0/1)")
    record("block masks", case, "max count", float(counts.max()), 75.0, "patches")
    standard_error = float(cpu_counts.std()) / math.sqrt(batch) * math.sqrt(2)
    record("block masks", case, "mean count vs CPU", abs(float(counts.mean() - cpu_counts.mean())),
           4 * standard_error, "abs diff")
    p = float((cpu_counts == 75).double().mean())
    record("block masks", case, "P(count = 75) vs CPU", abs(float((counts == 75).double().mean()) - p),
           4 * math.sqrt(2 * p * (1 - p) / batch), "abs diff")
    freq, cpu_freq = gpu.double().mean(0).cpu(), cpu.double().mean(0)
    share = float(cpu_freq.mean())  # two samples' noise is sqrt(2 p (1 - p) / n) per position: allow twice that
    record("block masks", case, "per-position frequency", rel_err(freq, cpu_freq),
           2 * math.sqrt(2 * share * (1 - share) / batch) / share)


def grad_errors(grads: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], eps: float = 1e-12) -> Dict[str, float]:
    """Per parameter, ‖g − g_ref‖ / max(‖g_ref‖, eps): each gradient against its own size, so a small
    or cancelling one (the relative-position table, the mask token) is not judged by the largest.
    A gradient present on one side only counts as NaN (a failure)."""
    errors = {}
    for name in sorted(set(grads) | set(want)):
        if name not in grads or name not in want:
            errors[name] = float("nan")
            continue
        g, w = grads[name].detach().double(), want[name].detach().double()
        errors[name] = float((g - w).norm() / max(float(w.norm()), eps))
    return errors


MODEL_BOUNDS = {False: 1e-4, True: 5e-2}  # per-tensor grad rel err: fp32 (TF32 off); both sides bf16 autocast


def check_model(depth: int, batch: int, preset: str = "beit_base", **overrides: object) -> None:
    """Whole MIM step: fastbeit (Triton attention + kernels) against the line-by-line reference model
    with the same weights and inputs, in fp32 and with both under the same bf16 autocast. Loss, then
    each parameter's gradient with :func:`grad_errors`: the worst one, and a row per tensor over its
    bound, so a failure names what is off."""
    from fastbeit.config import make_config
    from fastbeit.kernels.block_mask import sample_block_masks
    from fastbeit.model import BeitForMaskedImageModeling
    from fastbeit.reference import ReferenceBeitForMaskedImageModeling

    cfg = make_config(preset, depth=depth, drop_path_rate=0.0, attn_backend="triton", kernels="triton", **overrides)
    torch.manual_seed(0)
    fast = BeitForMaskedImageModeling(cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name:
                p.normal_(0, 0.5)
    ref = ReferenceBeitForMaskedImageModeling(cfg).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    grid = cfg.grid[0]
    if grid == 14:
        masks = sample_block_masks(batch, seed=11, device=DEVICE)
    else:
        masks = torch.rand(batch, cfg.num_patches, device=DEVICE) < 0.4
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.num_patches), device=DEVICE)

    def step(model, amp: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, torch.bfloat16, enabled=amp):
            out = model.forward_loss(images, masks, ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach().double(), grads

    for amp, bound in MODEL_BOUNDS.items():
        case = f"{preset} depth {depth}, B{batch}, " + ("bf16 autocast both" if amp else "fp32")
        want_loss, want_grads = step(ref, amp)
        loss, grads = step(fast, amp)
        record("model step", case, "loss", float((loss - want_loss).abs() / want_loss.abs()), bound / 10)
        errors = grad_errors(grads, want_grads)
        worst = max(errors, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf)
        record("model step", case, f"worst grad ({worst})", errors[worst], bound, "per-tensor rel err")
        ROWS[-1]["per_tensor"] = errors
        for name, err in errors.items():
            if name != worst and not (math.isfinite(err) and err <= bound):
                record("model step", case, f"grad {name}", err, bound, "per-tensor rel err")


def run_all(quick: bool = False) -> List[Dict[str, object]]:
    """Every check; ``quick`` keeps only the small cases (for the CPU interpreter)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ROWS.clear()
    bf16 = torch.bfloat16
    # Every new (N, head dim, dtypes, bias) compiles 12 autotune candidates: few cases, chosen to cover
    # BEiT-Base, odd N, 16-bit and fp32 math, shared / per-image / no bias.
    # The fp32 shared-bias case has several images per dbias program (about 5 on a 132-SM H200).
    attention = [(3, 5, 197, 64, torch.float16, "per-image"), (2, 3, 65, 32, torch.float32, "none"),
                 (48, 12, 197, 64, torch.float32, "shared")]
    ce = [(5, 196, 72, 8191, torch.float32, None), (7, 49, 200, 1000, bf16, None)]
    embed = [(3, 13, 40, torch.float32), (5, 196, 768, bf16)]
    heads = [(1001, 200, 8191, torch.float32), (37, 33, 1000, bf16)]
    if quick:
        heads = [(37, 33, 100, bf16)]
        attention = [(5, 2, 33, 16, torch.float32, "shared"), (1, 2, 37, 16, bf16, "per-image")]
        ce = ce[1:]
    else:
        attention.append((64, 12, 197, 64, bf16, "shared"))
        ce += [(64, 196, 768, 8192, bf16, 75), (64, 196, 768, 8192, bf16, None)]
        embed.append((64, 196, 768, torch.float32))
        heads += [(64 * 196, 2048, 8192, bf16), (64 * 196, 2048, 8192, torch.float32)]  # DALL-E's head
    for args in attention:
        guarded("attention", str(args), lambda a=args: check_attention(*a))
    for args in ce:
        guarded("gathered CE", str(args), lambda a=args: check_gathered_ce(*a))
    for args in embed:
        guarded("masked embed", str(args), lambda a=args: check_masked_embed(*a))
    for args in heads:
        guarded("token argmax", str(args), lambda a=args: check_token_argmax(*a))
    guarded("block masks", "masks", lambda: check_block_masks(512 if quick else 8192))
    if quick:  # the same comparison at a size the interpreter runs in seconds
        guarded("model step", "tiny", lambda: check_model(1, 2, "beit_tiny", img_size=32, patch_size=8,
                                                          embed_dim=32, num_heads=2, vocab_size=64))
    else:
        guarded("model step", "depth 2", lambda: check_model(2, 8))
    return list(ROWS)


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"


def print_table(rows: List[Dict[str, object]]) -> None:
    print(f"{'check':<13} {'case':<44} {'output':<34} {'value':>10} {'bound':>9}  ok")
    for r in rows:
        print(f"{r['check']:<13} {str(r['case'])[:44]:<44} {str(r['output'])[:34]:<34} {r['value']:>10.3g} "
              f"{r['bound']:>9.3g}  {'ok' if r['ok'] else 'FAIL'}")
        if "error" in r:
            print("    " + str(r["error"]).replace("\n", "\n    ")[-1500:])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu runs the kernels in the interpreter (TRITON_INTERPRET=1): a check of this script")
    p.add_argument("--quick", action="store_true", help="small cases only")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (the interpreter tests cover CPU)")
        return 0
    start = time.perf_counter()
    stopped = None
    try:
        with sigterm_as_interrupt():
            rows = run_all(args.quick)
    except KeyboardInterrupt:  # gpu_run.sh's time limit (SIGTERM) or Ctrl-C: report the rows that finished
        rows, stopped = list(ROWS), "interrupted before every check ran"
    print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} rows ok in {time.perf_counter() - start:.0f} s on "
          f"{device_name()} (torch {torch.__version__})" + (f"; {stopped}" if stopped else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device_name(), torch=torch.__version__, rows=rows, stopped=stopped), fh, indent=1)
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
