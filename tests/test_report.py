"""The step benchmark, the FLOP counter and the report CLI, at tiny shapes on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch
from helpers import TINY, tiny_pair
from torch.utils.flop_counter import FlopCounterMode

from fastbeit import bench_step as bs
from fastbeit import report
from fastbeit.config import make_config
from fastbeit.errors import UserError
from fastbeit.flops import (
    encoder_forward_flops,
    head_forward_flops,
    measure_matmul_tflops,
    mfu,
    step_flops,
    tokenizer_forward_flops,
)
from fastbeit.reference import ReferenceBeitForMaskedImageModeling
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig

# The smallest CLI run that still goes through every contender and section.
TINY_CLI = ["--device", "cpu", "--model", "beit_tiny", "--depth", "1", "--batch", "2", "--img-size", "32",
            "--patch-size", "4", "--vocab", "64", "--warmup", "0", "--iters", "1", "--profile-steps", "1"]


def _inputs(cfg, batch: int = 2, exact: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    masks = bs.make_masks(batch, cfg.grid[0], exact=exact, seed=seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.num_patches), generator=gen)
    return images, masks, ids


def test_flops_match_flop_counter_forward_and_training():
    cfg = make_config("beit_tiny", **TINY)
    model = ReferenceBeitForMaskedImageModeling(cfg)
    images, masks, ids = _inputs(cfg, batch=2)
    num_masked = float(masks.sum()) / 2
    with FlopCounterMode(display=False) as fwd:
        out = model.forward_loss(images, masks, ids)
    analytic = encoder_forward_flops(cfg) + head_forward_flops(cfg, num_masked)
    assert fwd.get_total_flops() / 2 == pytest.approx(analytic, rel=0.01)
    with FlopCounterMode(display=False) as train:
        model.forward_loss(images, masks, ids).loss.backward()
    del out
    flops = step_flops(cfg, DVAEConfig(n_hid=16, vocab_size=97, image_size=64), num_masked)
    # 3x forward is the convention; the patch embedding needs no input gradient (images), so a bit less.
    assert train.get_total_flops() / 2 == pytest.approx(flops.model_training, rel=0.03)


def test_tokenizer_flops_match_flop_counter():
    cfg = DVAEConfig(n_hid=16, n_blk_per_group=2, vocab_size=64, image_size=32, decoder=False)
    with FlopCounterMode(display=False) as counter:
        DiscreteVAE(cfg).encode(torch.rand(1, 3, 32, 32))
    assert counter.get_total_flops() == pytest.approx(tokenizer_forward_flops(cfg), rel=1e-6)


def test_base_step_flops_match_design_figures():
    f = step_flops(make_config("beit_base"), DVAEConfig(n_hid=256, n_blk_per_group=2, vocab_size=8192), 75)
    assert f.encoder_forward / 1e9 == pytest.approx(35, rel=0.02)
    assert f.tokenizer_forward / 1e9 == pytest.approx(52, rel=0.02)
    assert f.head_forward / 1e9 == pytest.approx(0.94, rel=0.02)
    assert f.training / 1e9 == pytest.approx(160, rel=0.02)


def test_matmul_rate_and_mfu():
    tflops = measure_matmul_tflops("cpu", torch.float32, size=128, repeats=1)
    assert tflops > 0
    assert mfu(100.0, 1e9, 1.0) == pytest.approx(0.1)


def test_masks_are_seeded_and_exact_masks_have_the_target_count():
    target, min_block = bs.mask_settings(14)
    assert (target, min_block) == (75, 16)
    a, b = bs.make_masks(8, 14, seed=3), bs.make_masks(8, 14, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 196) and int(a.sum(1).max()) <= 75
    exact = bs.make_masks(8, 14, exact=True, seed=3)
    assert exact.sum(1).tolist() == [75] * 8


def test_unknown_contender_is_a_user_error():
    assert bs.parse_contender("timm-compile") == ("timm", True)
    with pytest.raises(UserError):
        bs.parse_contender("megatron")


def test_timm_contender_computes_our_loss_for_our_weights():
    fast, ref = tiny_pair()
    timm_model = bs.TimmBeitMIM(fast.cfg)
    timm_model.load_fastbeit_state(fast.state_dict())
    images, masks, ids = _inputs(fast.cfg, batch=3, exact=False)
    losses = {}
    for name, model in {"fastbeit": fast, "reference": ref, "timm": timm_model}.items():
        model.eval()
        with torch.no_grad():
            losses[name] = float(model.forward_loss(images, masks, ids).loss)
    assert losses["timm"] == pytest.approx(losses["reference"], rel=1e-5)
    assert losses["fastbeit"] == pytest.approx(losses["reference"], rel=1e-4)
    # the static-shape gather (exact masks + num_masked) is the same loss as the boolean one
    exact = bs.make_masks(3, fast.cfg.grid[0], exact=True)
    target = bs.mask_settings(fast.cfg.grid[0])[0]
    with torch.no_grad():
        static = float(timm_model.forward_loss(images, exact, ids, num_masked=target).loss)
        boolean = float(timm_model.forward_loss(images, exact, ids).loss)
    assert static == pytest.approx(boolean, rel=1e-5)


def test_fresh_timm_contender_loss_is_near_chance():
    cfg = make_config("beit_tiny", **TINY)
    images, masks, ids = _inputs(cfg, exact=False)
    with torch.no_grad():
        loss = float(bs.TimmBeitMIM(cfg).eval().forward_loss(images, masks, ids).loss)
    assert loss == pytest.approx(math.log(cfg.vocab_size), rel=0.05)


def test_profile_breakdown_attributes_forward_and_backward():
    c = bs.build_contender("reference", "beit_tiny", 2, 32, 4, "none", "cpu", vocab_size=64, depth=1)
    try:
        bd = bs.profile_breakdown(c, steps=1, warmup=1)
    finally:
        c.close()
    comps = bd["components"]
    assert set(comps) == set(bs.COMPONENTS)
    for part in ("attention", "mlp", "loss"):
        assert comps[part]["forward"] > 0 and comps[part]["backward"] > 0, part
    assert comps["tokenizer"]["forward"] > 0 and comps["optimizer"]["forward"] > 0
    assert bd["profiled_ms"] == pytest.approx(sum(v["forward"] + v["backward"] for v in comps.values()))


def test_datasheet_peak_only_for_parts_on_file():
    assert report.datasheet_peak("NVIDIA H200", "bf16") == 989.4
    assert report.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert report.datasheet_peak("NVIDIA H100 PCIe", "bf16") is None  # lower clocks: not the SXM figure
    assert report.datasheet_peak("NVIDIA H200", "none") is None and report.datasheet_peak("cpu", "bf16") is None
    row = {"img_per_s": 1000.0, "device": "NVIDIA H200", "amp": "bf16"}
    report.add_mfu(row, 1e12, 800.0)
    assert row["mfu"] == pytest.approx(1.25) and row["mfu_peak"] == pytest.approx(1000 / 989.4)


def test_every_contender_steps_through_pretrains_loss_module_and_reports_its_warmup():
    """The benchmark's forward is the pre-training loop's (so a change to the compiled step reaches
    both), and each row says how long its warm-up (compile, autotune) took beyond steady steps."""
    from fastbeit.pretrain import LossModule

    assert "fastbeit-compile" in bs.CONTENDERS and "timm-compile" in bs.CONTENDERS
    c = bs.build_contender("fastbeit", "beit_tiny", 2, 32, 4, "none", "cpu", vocab_size=64, depth=1)
    try:
        assert isinstance(c.forward, LossModule)
        row = bs.measure(c, warmup=1, iters=1)
    finally:
        c.close()
    assert row["warmup_s"] > 0 and row["compile_s"] >= 0
    assert isinstance(bs.loss_step(torch.nn.Linear(2, 2), compile=False), LossModule)


def test_sweep_records_a_failing_contender_as_skipped():
    def broken():
        raise UserError("--attn triton cannot run here")

    rows = bs.sweep({"broken": broken}, warmup=0, iters=1)
    assert "cannot run here" in rows["broken"]["skipped"]


@pytest.mark.slow
def test_report_cli_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([*TINY_CLI, "--contenders", "fastbeit,reference,timm", "--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    for needle in ("fastbeit", "reference", "timm", "vs reference", "×", "CPU sanity run", "GFLOP", "MFU",
                   "Where a fastbeit step's time goes", "python -m fastbeit.report --device cpu"):
        assert needle in text, needle
    assert (out / "img_per_s.png").stat().st_size > 0 and (out / "peak_memory.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"fastbeit", "reference", "timm"}
    assert all(row["img_per_s"] > 0 for row in results["rows"].values())
    assert results["breakdown"]["components"]["attention"]["backward"] > 0


@pytest.mark.slow
def test_report_ablate_on_cpu(tmp_path):
    out = tmp_path / "ablate"
    argv = [*TINY_CLI, "--ablate", "--ablations", "tokenizer-fp32,exact-masks", "--output", str(out)]
    assert report.main(argv) == 0
    text = (out / "report.md").read_text()
    for needle in ("base", "eager fp32 module", "exact-count masks", "vs first row", "The tokenizer's forms",
                   "fused ReLU + 1x1 conv + argmax"):
        assert needle in text, needle
    assert (out / "ablation.png").stat().st_size > 0


def _bench_entry(name, extra, mean):
    return {"group": "step", "name": name, "fullname": f"benchmarks/test_bench_step.py::{name}", "params": {},
            "param": None, "extra_info": extra, "options": {}, "stats": {"mean": mean, "stddev": 0.001, "rounds": 5}}


def test_report_from_pytest_benchmark_json(tmp_path):
    common = dict(model="beit_base", depth=12, batch=128, img_size=224, patch_size=16, amp="bf16",
                  device="NVIDIA H200", vocab_size=8192, tokenizer_size="dalle", masked_per_image=74.5,
                  attn_backend="auto→triton", kernels="auto→triton", fused_adamw=True)
    data = {
        "machine_info": {"node": "gpu-box", "python_version": "3.12.0", "cpu": {"brand_raw": "Xeon"}},
        "commit_info": {"id": "abc123", "dirty": False},
        "datetime": "2026-01-01T00:00:00",
        "version": "5.1.0",
        "benchmarks": [
            _bench_entry("test_step[base-b128-fastbeit]", {**common, "contender": "fastbeit", "img_per_s": 3000.0,
                                                             "step_ms": 42.7, "peak_mem_bytes": 20 * 2**30}, 0.21),
            _bench_entry("test_step[base-b128-reference]", {**common, "contender": "reference", "img_per_s": 1000.0,
                                                              "step_ms": 128.0, "peak_mem_bytes": 40 * 2**30}, 0.64),
            _bench_entry("test_matmul_rate", {"matmul_tflops": 800.0, "dtype": "bfloat16"}, 0.5),
            _bench_entry("test_attention[triton]", {"peak_mem_mb": 12.5}, 0.002),
        ],
    }
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "from-json"
    assert report.main(["--from-json", str(src), "--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "×3.00" in text and "20.00 GiB" in text and "test_attention[triton]" in text and "abc123" in text
    assert "60.1 %" in text  # 3000 img/s × 160.3 GFLOP / 800 TFLOP/s
    assert "48.6 %" in text and "989.4 TFLOP/s" in text  # the same against the H200's datasheet peak
    assert "CPU sanity run" not in text
    assert (out / "img_per_s.png").is_file() and (out / "peak_memory.png").is_file()


@pytest.mark.parametrize("argv", [
    ["--from-json", "/nonexistent/bench.json"],
    ["--device", "cpu", "--contenders", "fastbeit,megatron"],
    ["--device", "cpu", "--img-size", "30", "--patch-size", "4"],
    ["--device", "cpu", "--ablate", "--ablations", "warp-drive"],
])
def test_report_user_errors_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([*argv, "--output", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_from_json_rejects_a_non_benchmark_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="benchmarks"):
        report.load_benchmark_json(str(bad))


def test_a_stopped_run_still_reports_the_measured_rows(tmp_path, monkeypatch):
    """``timeout`` sends SIGTERM: the rows measured so far still make a report (exit status 1)."""

    def partial(args, out, results):
        results.update(kind="comparison", env=report.environment("cmd", "cpu"), rows={},
                       settings={k: getattr(args, k) for k in ("model", "batch", "img_size", "patch_size", "depth",
                                                                "amp", "vocab", "tokenizer", "warmup", "iters")})
        results["flops"] = report._flops(args).as_dict()
        results["encoder_breakdown"] = {"mlp": 1.0}
        results["matmul"] = {"dtype": "float32", "tflops": 1.0}
        results["rows"]["fastbeit"] = {"contender": "fastbeit", "img_per_s": 10.0, "step_ms": 400.0, "mfu": 0.1}
        os.kill(os.getpid(), signal.SIGTERM)  # cli_entry turns it into KeyboardInterrupt("signal 15")
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(report, "measure_all", partial)
    out = tmp_path / "stopped"
    assert report.main(["--device", "cpu", "--output", str(out)]) == 1
    text = (out / "report.md").read_text()
    assert "Incomplete" in text and "signal 15" in text and "fastbeit" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("contender", ["fastbeit", "reference", "timm"])
def test_cuda_step_runs_and_the_breakdown_sees_kernel_time(contender):
    """On a GPU: each contender steps in bf16 with finite loss, and the profiler charges kernel
    time to the forward and backward of attention and MLP (the CUDA attribution path)."""
    c = bs.build_contender(contender, "beit_tiny", 4, 32, 4, "bf16", "cuda", vocab_size=256, depth=2)
    try:
        row = bs.measure(c, warmup=1, iters=2)
        assert math.isfinite(row["loss"]) and row["peak_mem_bytes"] > 0
        if contender == "fastbeit":
            assert row["attn_backend"] == "auto→triton" and row["kernels"] == "auto→triton"
        bd = bs.profile_breakdown(c, steps=1, warmup=0)
    finally:
        c.close()
    assert bd["timer"] == "cuda kernels"
    for part in ("attention", "mlp"):
        assert bd["components"][part]["forward"] > 0 and bd["components"][part]["backward"] > 0, part


def test_cuda_self_time_reads_the_device_name_without_the_deprecated_one():
    """On CUDA the breakdown reads ``self_device_time_total``; touching the deprecated
    ``self_cuda_time_total`` as well would warn on every event (and sum each subtree twice)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(8, 8).sum()
    events = list(prof.events())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ev in events:
            assert bs._self_time(ev, cuda=True) == float(ev.self_device_time_total)
