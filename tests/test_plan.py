"""The roofline plan (``python -m fastbeit.report --plan``): the real BEiT-Base step at batch 256
counted on fake tensors, every part attributed, the fused estimates below the eager counts."""

import json
import math

import pytest
import torch
from torch import nn

from fastbeit import plan as P
from fastbeit.plan_count import StepRecorder
from fastbeit.report import main as report_main

TINY = ["--model", "beit_tiny", "--depth", "2", "--batch", "4", "--img-size", "32", "--patch-size", "4",
        "--vocab", "1024", "--tokenizer", "tiny"]


@pytest.fixture(scope="module")
def base():
    """BEiT-Base, batch 256, bf16, DALL-E-width tokenizer: the step and its plan."""
    step = P.count_step(P.PlanSettings())
    return step, P.build_plan(step)


def test_the_full_size_step_is_counted_in_seconds(base):
    step, plan = base
    assert step.seconds < 20, f"counting took {step.seconds:.1f} s"
    assert plan["settings"]["batch"] == 256 and plan["settings"]["model"] == "beit_base"
    assert plan["parameters"] > 85e6  # BEiT-Base + lm_head
    assert 60 < plan["masked_per_image"] <= 75


def test_counted_flops_per_image_match_the_analytic_count(base):
    fl = base[1]["flops_per_image"]
    assert fl["counted"] == pytest.approx(fl["fastbeit.flops"], rel=0.02)
    assert fl["counted"] == pytest.approx(160e9, rel=0.05)


def test_every_part_is_present_with_its_work(base):
    for dev in base[1]["devices"].values():
        assert set(dev["parts"]) == set(P.PARTS)
        for name, part in dev["parts"].items():
            assert part["eager_gb"] > 0 and part["fused_gb"] > 0 and part["fused_ms"] > 0, name
        for name in ("tokenizer", "patch embed", "attention", "matmuls", "loss"):
            assert dev["parts"][name]["gflop"] > 0, name


def test_fused_kernels_move_fewer_bytes_than_the_eager_ops(base):
    parts = base[1]["devices"]["H100 SXM"]["parts"]
    assert parts["attention"]["eager_gb"] > 5 * parts["attention"]["fused_gb"]  # no N x N tensors
    assert parts["loss"]["eager_gb"] > parts["loss"]["fused_gb"]  # no [M, V] logits
    assert parts["norm & elementwise"]["eager_gb"] > parts["norm & elementwise"]["fused_gb"]
    assert parts["matmuls"]["eager_gb"] == parts["matmuls"]["fused_gb"]


def test_the_fused_step_estimate_is_a_throughput(base):
    plan = base[1]
    h100, h200 = plan["devices"]["H100 SXM"], plan["devices"]["H200"]
    for dev in (h100, h200):
        assert isinstance(dev["fused_img_per_s"], float) and math.isfinite(dev["fused_img_per_s"])
        assert dev["fused_img_per_s"] > dev["eager_img_per_s"] > 0
        assert dev["fused_img_per_s"] >= dev["fused_strict_img_per_s"] > dev["eager_img_per_s"]
    assert h200["fused_img_per_s"] >= h100["fused_img_per_s"]  # same FLOP/s, more bandwidth
    note = P.standing_in_the_way(plan)
    assert note is None or "largest parts" in note
    assert "Performance plan (estimate, not a measurement)" in P.plan_markdown(plan)


def test_chains_read_their_inputs_once_and_write_what_is_read_later():
    rec = lambda name, kind, reads, writes: P.OpRecord(name, kind, "forward", "norm & elementwise", "", 0.0,
                                                        reads, writes)
    records = [
        rec("mul", "other", [(1, 100)], [(2, 100)]),
        rec("add", "other", [(2, 100), (1, 100)], [(3, 100)]),
        rec("other chain", "other", [(9, 10)], [(10, 10)]),
        rec("gelu", "other", [(3, 100)], [(4, 100)]),
        rec("mm", "matmul", [(4, 100)], [(5, 100)]),
    ]
    kernels = P.fuse_chains(records, live=set())
    assert [k.bytes for k in kernels] == [200, 10, 200]  # reads 1 once, writes 4 only; 10 is never read
    records.insert(1, rec("fastbeit::op", "custom", [(2, 100)], [(7, 100)]))  # another library's kernel
    assert [k.bytes for k in P.fuse_chains(records, live={7})] == [200, 200, 300, 10, 200]


class _Attn(nn.Module):
    def forward(self, x):
        return torch.ops.plantest.attention_like(x)


def test_unknown_custom_ops_take_their_part_from_the_module_scope():
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not hasattr(torch.ops.plantest, "attention_like"):
        @torch.library.custom_op("plantest::attention_like", mutates_args=())
        def attention_like(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        attention_like.register_fake(lambda x: torch.empty_like(x))
    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Module()])
    root.blocks[0].attn = _Attn()
    recorder = StepRecorder({})
    handles = recorder.watch(root)
    with pytest.warns(UserWarning, match="no FLOP formula"), FakeTensorMode(), recorder:
        root.blocks[0].attn(torch.empty(2, 5, 8))
    for h in handles:
        h.remove()
    (op,) = [r for r in recorder.records if "attention_like" in r.name]
    assert op.part == "attention" and op.bytes == 2 * 2 * 5 * 8 * 4


def test_cli_prints_the_tables_and_writes_plan_files(tmp_path, capsys):
    assert report_main(["--plan", *TINY, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "H100 SXM" in out and "H200" in out and "fused ms" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["kind"] == "plan" and set(plan["devices"]) == {"H100 SXM", "H200"}
    assert "## Assumptions" in (tmp_path / "plan.md").read_text()


def test_measure_on_cpu_adds_a_measured_column_labelled_cpu_time(tmp_path):
    assert report_main(["--plan", *TINY, "--measure", "--device", "cpu", "--steps", "1",
                        "--output", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "CPU time" in plan["measured"]["label"]
    parts = plan["devices"]["H100 SXM"]["parts"]
    assert all(isinstance(parts[p]["measured_ms"], float) for p in P.PARTS)
    for name in ("tokenizer", "attention", "matmuls", "norm & elementwise", "loss", "optimizer"):
        assert parts[name]["measured_ms"] > 0, name
    assert "CPU time) |" in (tmp_path / "plan.md").read_text()


def test_bad_sizes_are_user_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        report_main(["--plan", "--batch", "0"])
    assert exc.value.code == 2 and "error: --batch must be positive" in capsys.readouterr().err


def test_efficiencies_can_be_replaced_and_bad_ones_are_user_errors(capsys):
    eff = P.parse_efficiency("gemm=0.8, memory=0.9")
    assert (eff.gemm, eff.memory, eff.conv) == (0.8, 0.9, P.Efficiency().conv)
    with pytest.raises(SystemExit) as exc:
        report_main(["--plan", "--eff", "gemm=2"])
    assert exc.value.code == 2 and "error: --eff" in capsys.readouterr().err
