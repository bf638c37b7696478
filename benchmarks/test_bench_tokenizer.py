"""The tokenizer's forms (``fastbeit.tokenizer.forms``) one at a time, and the fused head alone.

CUDA: DALL-E's width (n_hid 256, 2 blocks per group, 8192 codes) at batch 256, 112 px; the issue's
target is ``default`` ≥ 2× ``bf16-autocast`` (channels-last). CPU: the shipped tokenizer's width at
batch 8, a smoke case that also records eager vs folded fp32 (the folded form must not be slower).

    pytest benchmarks/test_bench_tokenizer.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastbeit.kernels.token_argmax import token_argmax, token_argmax_reference
from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig
from fastbeit.tokenizer.forms import FORMS, encoder_for

cuda = pytest.mark.cuda
DALLE = dict(n_hid=256, n_blk_per_group=2, vocab_size=8192, image_size=112, decoder=False)
SHIPPED = dict(n_hid=16, n_blk_per_group=1, vocab_size=8192, image_size=112, decoder=False)


def _setup(width: dict, batch: int, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = DiscreteVAE(DVAEConfig(**width)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    return model, (0.1 + 0.8 * torch.rand(batch, 3, 112, 112, generator=g)).to(device)


@cuda
@pytest.mark.parametrize("form", [f for f in FORMS if f != "compile"])
def test_tokenizer_form_dalle_b256(measure, form):
    model, x = _setup(DALLE, 256, "cuda")
    fn = encoder_for(model, FORMS[form][1], x.device)
    measure(lambda: fn(x), rounds=10, images=256, form=form)


@cuda
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_fused_head_dalle_b256(measure, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    feats = torch.randn(256 * 196, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(8192, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    b = torch.zeros(8192, device="cuda")
    fn = token_argmax if impl == "triton" else token_argmax_reference
    measure(lambda: fn(feats, w, b, relu=True), rounds=20, impl=impl)


@pytest.mark.parametrize("form", ["eager-fp32", "folded", "default"])
def test_smoke_tokenizer_forms_cpu(measure, form):
    model, x = _setup(SHIPPED, 8, "cpu")
    fn = encoder_for(model, FORMS[form][1], x.device)
    measure(lambda: fn(x), device="cpu", rounds=5, warmup_rounds=1, images=8, form=form)
