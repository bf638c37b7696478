"""The pre-training step as one compiled, sync-free graph, checked on the CPU.

* ``torch.compile(fullgraph=True)`` of forward + loss (+ backward) traces with 0 graph breaks for the
  Triton kernels (interpreter) and the plain-PyTorch paths, with faithful variable-count masks and
  exact ones, and gives the eager loss, accuracy and gradients. Most cases use the ``aot_eager``
  backend (dynamo + AOT autograd: the whole capture, seconds per case); one runs Inductor's C++
  code generation end to end.
* A whole ``Trainer.step`` (tokenizer, masks, model, loss, backward, clipping, AdamW) runs no op
  that reads a value back to the host (``.item()``, ``nonzero``, boolean indexing, ...).
* On CUDA (skipped here): steps under ``torch.cuda.set_sync_debug_mode("error")``, and CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, cpu_allocations, tiny_pair, variable_masks
from test_pretrain import tiny_args, tiny_setup  # noqa: F401  (the module-scoped fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from fastbeit import pretrain
from fastbeit.compiled import CompiledStep
from fastbeit.errors import UserError
from fastbeit.model import create_model

MAX_MASKED = 25


def _inputs(exact: bool):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    masks = variable_masks(3, 8, MAX_MASKED)
    if exact:  # top up every image to exactly MAX_MASKED (the static-count variant)
        for row in masks:
            free = (~row).nonzero().squeeze(1)
            row[free[: MAX_MASKED - int(row.sum())]] = True
        assert (masks.sum(1) == MAX_MASKED).all()
    else:
        assert len(set(masks.sum(1).tolist())) > 1, "want the faithful variable counts"
    ids = torch.randint(0, TINY["vocab_size"], (3, 64))
    return images, masks, ids


def _loss_and_grads(fn, model, *inputs):
    model.zero_grad(set_to_none=True)
    loss, acc = fn(*inputs)
    loss.backward()
    return loss.detach(), acc.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _step_fn(model):
    def step(images, masks, ids):
        out = model.forward_loss(images, masks, ids, MAX_MASKED)
        return out.loss, out.mlm_acc

    return step


@pytest.mark.parametrize("exact", [False, True], ids=["blockwise-variable", "exact"])
@pytest.mark.parametrize("attn,kernels", [("triton", "triton"), ("sdpa", "reference"), ("eager", "reference")])
def test_fullgraph_compile_has_no_graph_break_and_equals_eager(attn, kernels, exact):
    model, ref = tiny_pair(attn_backend=attn, kernels=kernels)
    inputs = _inputs(exact)
    step = _step_fn(model)
    explained = torch._dynamo.explain(step)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, acc_c, grads_c = _loss_and_grads(compiled, model, *inputs)
    loss_e, acc_e, grads_e = _loss_and_grads(step, model, *inputs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert acc_c == acc_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-7, msg=name)

    # ... and both are the original computation (boolean gather, full logits) on the same weights
    ref.zero_grad(set_to_none=True)
    out = ref.forward_loss(*inputs)
    out.loss.backward()
    torch.testing.assert_close(loss_c, out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_c, out.mlm_acc)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pixel_regression_compiles_too():
    model = create_model("beit_tiny", **{**TINY, "vocab_size": 48}, kernels="reference", attn_backend="sdpa")
    images, masks, _ = _inputs(exact=False)

    def step(images, masks):
        out = model.forward_pixel_loss(images, masks, MAX_MASKED)
        return out.loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images, masks), step(images, masks), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_inductor_builds_the_step_and_matches_eager():
    """Inductor's generated C++ (its fusions of the norm / elementwise work) around the plain ops."""
    model, _ = tiny_pair(attn_backend="sdpa", kernels="reference", depth=1)
    inputs = _inputs(exact=False)
    step = _step_fn(model)
    compiled = CompiledStep(torch.nn.Module(), say=lambda msg: None)  # the wrapper the CLI uses
    compiled.module, compiled.compiled = step, torch.compile(step, fullgraph=True)
    loss_c, acc_c, grads_c = _loss_and_grads(compiled, model, *inputs)
    assert compiled.state == "compiled"
    loss_e, acc_e, grads_e = _loss_and_grads(step, model, *inputs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert acc_c == acc_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_machine_that_cannot_compile_falls_back_with_one_line(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_compile(module, **kwargs):
        def run(*args):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("no working C++ compiler found"))

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    notes = []
    step = CompiledStep(torch.nn.Linear(2, 1), say=notes.append)
    out = step(torch.ones(1, 2))
    assert out.shape == (1, 1) and step.state == "eager"
    assert len(notes) == 1 and "eagerly" in notes[0] and "--no-compile" in notes[0]
    step(torch.ones(1, 2))
    assert len(notes) == 1


def test_a_graph_break_falls_back_with_a_warning_that_names_it_a_bug():
    """A graph break is fastbeit's defect, not the machine's: the one line says so."""

    class Breaks(torch.nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x * 2

    notes = []
    step = CompiledStep(Breaks(), backend="eager", say=notes.append)
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0)) and step.state == "eager"
    assert len(notes) == 1 and notes[0].startswith("warning:") and "please report" in notes[0], notes


def test_model_errors_are_not_mistaken_for_compiler_failures(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    step = CompiledStep(lambda x: x.view(3), say=lambda msg: None)
    with pytest.raises(RuntimeError, match="shape"):
        step(torch.ones(2))


def test_unsupported_backend_is_refused_before_any_compile():
    model = create_model("beit_tiny", **{**TINY, "embed_dim": 3 * 160, "num_heads": 3}, attn_backend="triton")
    with pytest.raises(UserError, match="head dim 160"):
        model.check_fast_paths(torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------ no host syncs


class SyncRecorder(TorchDispatchMode):
    """Records every aten op that makes the host wait for the device's values."""

    READS_BACK = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "is_nonzero",
                  "equal", "unique", "_unique2", "unique_consecutive", "allclose", "argwhere"}

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in self.READS_BACK or bool_index:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [
    ("--kernels", "triton", "--attn", "triton"),
    ("--kernels", "reference", "--attn", "sdpa", "--mask_sampler", "gpu"),
    ("--kernels", "triton", "--attn", "triton", "--target", "pixels"),
], ids=["triton-cpu-masks", "reference-gpu-sampler", "pixels"])
def test_a_training_step_never_reads_back_from_the_device(tiny_setup, tmp_path, extra):  # noqa: F811
    args = pretrain.resolve_args(tiny_args(tiny_setup, tmp_path, "--clip_grad", "3.0", *extra))
    trainer = pretrain.Trainer(args)
    batches = iter(trainer.data.loader)
    trainer.step(next(batches))  # one-time set-up (optimizer state) outside the recording
    batch = next(batches)  # CPU data work (augmentation draws its parameters with .item()) stays outside
    recorder = SyncRecorder()
    with recorder:
        stats = trainer.step(batch)
    assert recorder.ops > 100  # the step really ran under the recorder
    assert recorder.syncs == []
    assert torch.isfinite(stats["loss"]) and torch.isfinite(stats["grad_norm"])


def test_the_recorder_catches_the_original_boolean_gather():
    recorder = SyncRecorder()
    x, mask = torch.randn(2, 5, 3), torch.rand(2, 5) > 0.5
    with recorder:
        x[mask].sum().item()
    assert any("index" in s for s in recorder.syncs) and any("_local_scalar_dense" in s for s in recorder.syncs)


def test_the_training_step_never_materialises_scores_or_logits(monkeypatch):
    """No allocation in the fused step's forward and backward is as large as the [B, H, N, N]
    attention scores or the masked rows' [B·K, V] logits; the backward's d(logits) goes through a
    bounded scratch (shrunk here to 32 rows so the 100 rows need 4 chunks; at BEiT-Base, batch 256,
    the default 2^24 elements are 1/9 of the logits). The original computation allocates both."""
    import fastbeit.kernels.gathered_ce as gce

    B, H, N, V = 4, TINY["num_heads"], 145, 3001  # 12 x 12 patches + [CLS]; V above everything else
    monkeypatch.setattr(gce, "_SCRATCH_ELEMENTS", 32 * V)
    model, ref = tiny_pair(attn_backend="triton", kernels="triton", img_size=48, vocab_size=V)
    torch.manual_seed(1)
    images, masks = torch.randn(B, 3, 48, 48), variable_masks(B, 12, MAX_MASKED)
    ids = torch.randint(0, V, (B, 144))
    scores, logits = 4 * B * H * N * N, 4 * B * MAX_MASKED * V  # float32 bytes
    fused = cpu_allocations(lambda: model.forward_loss(images, masks, ids, MAX_MASKED).loss.backward())
    assert len(fused) > 100 and max(fused) < min(scores, logits), (max(fused), scores, logits)
    original = cpu_allocations(lambda: ref.forward_loss(images, masks, ids).loss.backward())
    assert scores in original and max(original) >= 4 * int(masks.sum()) * V


# ------------------------------------------------------------------------------ CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_on_cuda_make_no_host_sync(tiny_setup, tmp_path, mode):  # noqa: F811
    """Faithful blockwise masks drawn on the GPU, compiled step (CUDA graphs with reduce-overhead)."""
    args = pretrain.resolve_args(tiny_args(tiny_setup, tmp_path, "--device", "cuda", "--amp", "bf16",
                                           "--mask_sampler", "gpu", "--compile", "--compile_mode", mode))
    trainer = pretrain.Trainer(args)
    batches = [tuple(t.cuda() for t in b) for b, _ in zip(trainer.data.loader, range(4))]
    for batch in batches[:2]:  # compile and warm up (CUDA graphs record on a later call)
        trainer.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            stats = trainer.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.train_model.state == "compiled"
    assert torch.isfinite(stats["loss"]).item()


# ------------------------------------------------------------------------------ the operators


def _opcheck_cases():
    """(operator, args) for each fastbeit operator, at small odd sizes."""
    from fastbeit.kernels import attention, block_mask, gathered_ce, masked_embed

    torch.manual_seed(0)
    B, N, D, V, H = 2, 13, 24, 37, 3
    hidden = torch.randn(B, N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    rows = torch.tensor([0, 3, 5, 13, 20, 25])
    row_targets = torch.randint(0, V, (6,))
    patches = torch.randn(B, N, D, requires_grad=True)
    mask = torch.rand(B, N) < 0.4
    tokens = [torch.randn(1, 1, D, requires_grad=True) for _ in range(2)]
    pos = torch.randn(1, N + 1, D, requires_grad=True)
    qkv = torch.randn(B, N, 3 * D, requires_grad=True)
    attn_bias = torch.randn(H, N, N, requires_grad=True)
    return [
        (gathered_ce._ce_fwd_op, (hidden, weight, bias, rows, row_targets, torch.float32)),
        (masked_embed._masked_embed_op, (patches, mask, *tokens, pos)),
        (attention._qkv_fwd_op, (qkv, attn_bias, H, (D // H) ** -0.5)),
        (block_mask._sample_op, (3, 4, 5, 6, 2, 6, 0.3, 1 / 0.3, "blockwise", 7, 11, torch.device("cpu"))),
    ]


@pytest.mark.parametrize("case", range(4), ids=["gathered_ce", "masked_embed", "flash_attn_qkv", "block_masks"])
def test_each_kernel_is_a_well_formed_pytorch_operator(case):
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides) and the
    autograd registration agree with what the real kernel does."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_masks_can_be_drawn_inside_a_compiled_graph():
    from fastbeit.kernels.block_mask import sample_block_masks

    def draw():
        return sample_block_masks(5, (14, 14), 75, 16, seed=3, offset=9, device="cpu")

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(), draw())


def test_under_ddp_the_model_stays_one_graph_and_equals_eager():
    """pretrain compiles DDP(LossModule) without fullgraph (DDP's own forward is stepped around);
    the model inside must still compile without a graph break, to the eager loss and gradients."""
    import torch.distributed as dist
    from helpers import free_port
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model, _ = tiny_pair(attn_backend="triton", kernels="triton")
        ddp = DistributedDataParallel(pretrain.LossModule(model))
        images, masks, ids = _inputs(exact=False)
        inputs = (images, masks, ids, MAX_MASKED)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(ddp)(*inputs)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        step = CompiledStep(ddp, backend="aot_eager", fullgraph=False, say=lambda msg: None)
        loss_c, acc_c, grads_c = _loss_and_grads(step, model, *inputs)
        assert step.state == "compiled"
        loss_e, acc_e, grads_e = _loss_and_grads(ddp, model, *inputs)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()
