"""The experts on torch's grouped GEMM (``moe.gemm=grouped_mm``: ``torch._grouped_mm``, what
torchtitan and GPUs run) against our loop and a naive per-expert loop, the padding GPUs need,
and the bf16 path exercised on this CPU (autocast, the router and the losses in fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe.config import ConfigError, MoEConfig, validate_moe
from moe.model.layers import MoELayer, Router
from moe.model.transformer import TransformerLM
from moe.ops import grouped_mm, resolve_gemm, torch_grouped_mm
from moe.training.loop import Trainer
from tests.conftest import tiny_config

COUNTS = {
    "uneven": [5, 0, 7, 3, 9, 1, 0, 6],
    "one-expert-takes-all": [0, 0, 31, 0],
    "all-empty-but-one-row": [0, 1, 0],
}


def _naive(x, w, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start : start + n] @ w[e])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("align", [None, 8, 16])
@pytest.mark.parametrize("case", list(COUNTS))
def test_torch_grouped_mm_equals_our_loop_and_a_naive_loop_with_gradients(case, align):
    counts = COUNTS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 24, generator=g)
    w = torch.randn(len(counts), 24, 40, generator=g)
    upstream = torch.randn(sum(counts), 40, generator=g)
    results = {}
    for name, fn in {
        "torch": lambda a, b: torch_grouped_mm(a, b, counts, align_rows=align),
        "ours": lambda a, b: grouped_mm(a, b, counts),
        "naive": lambda a, b: _naive(a, b, counts),
    }.items():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(upstream)
        results[name] = (y.detach(), xi.grad, wi.grad)
    for name in ("torch", "ours"):
        for got, want in zip(results[name], results["naive"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an expert with no rows gets a zero gradient, not garbage from the padding
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(results["torch"][2][e]) == 0


def test_a_gradient_with_zero_strides_and_no_rows_at_all_pass():
    w = torch.randn(3, 8, 4, requires_grad=True)
    x = torch.randn(6, 8, requires_grad=True)
    torch_grouped_mm(x, w, [2, 0, 4]).sum().backward()  # .sum()'s gradient is expanded (strides 0)
    torch.testing.assert_close(w.grad[0], x[:2].sum(0, keepdim=True).t().detach().expand(8, 4))
    empty = torch_grouped_mm(torch.zeros(0, 8), w, [0, 0, 0])
    assert empty.shape == (0, 4)


def test_bf16_grouped_mm_is_the_fp32_result_to_bf16_rounding():
    counts = [9, 0, 17, 6]
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 64, generator=g), torch.randn(4, 64, 48, generator=g)
    got = torch_grouped_mm(x.bfloat16(), w.bfloat16(), counts, align_rows=8)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _naive(x, w, counts), rtol=2e-2, atol=0.3)  # |y| ~ 8: 8 bits of mantissa


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_layer_on_grouped_mm_equals_the_layer_on_our_loop(activation):
    outs = {}
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    for gemm in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        cfg = MoEConfig(name="topk", num_experts=8, top_k=2, dropless=True, gemm=gemm, granularity=2)
        layer = MoELayer(32, 64, cfg, activation=activation)
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y.square().mean() + aux.aux_loss).backward()
        outs[gemm] = (y.detach(), xi.grad, *(p.grad for p in layer.parameters()))
    for a, b in zip(outs["loop"], outs["grouped_mm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_on_grouped_mm_follows_training_on_our_loop(tmp_path, tiny_data):
    losses = {}
    for gemm in ("loop", "grouped_mm"):
        cfg = tiny_config(tmp_path / gemm, "topk", steps=8)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gemm=gemm))
        losses[gemm] = [h["train/loss"] for h in Trainer(cfg, data=tiny_data).fit().history]
    assert losses["loop"] == pytest.approx(losses["grouped_mm"], rel=1e-4)


def test_gemm_names():
    assert resolve_gemm("auto", torch.device("cpu")) == "loop"  # measured faster here (docs/performance.md)
    assert resolve_gemm("auto", torch.device("cpu"), torch.bfloat16) == "loop"
    assert resolve_gemm("auto", torch.device("cuda"), torch.bfloat16) == "grouped_mm"  # (names only: no GPU here)
    assert resolve_gemm("auto", torch.device("cuda"), torch.float32) == "loop"
    assert resolve_gemm("grouped_mm", torch.device("cpu")) == "grouped_mm"
    with pytest.raises(ValueError, match="moe.gemm='cutlass'"):
        resolve_gemm("cutlass", torch.device("cpu"))
    with pytest.raises(ConfigError, match="moe.gemm='cutlass'; use auto"):
        validate_moe(MoEConfig(name="topk", gemm="cutlass"))


# ---------------------------------------------------------------------------------------------
# bf16 on CPU


def test_under_bf16_autocast_the_router_and_the_losses_stay_fp32(tiny_data):
    cfg = tiny_config("/unused", "deepseek")
    torch.manual_seed(0)
    model = TransformerLM(dataclasses.replace(cfg.model, vocab_size=256, block="llama"), cfg.moe)
    seen = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x, y = tiny_data.get_batch("train", 0, 4, 64, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert seen == [torch.float32, torch.float32]  # both MoE blocks' router logits
    assert out.logits.dtype == torch.bfloat16  # the matmuls did run in bf16
    assert out.lm_loss.dtype == out.aux_loss.dtype == out.z_loss.dtype == torch.float32


def test_a_bf16_training_step_stays_within_tolerance_of_fp32(tmp_path, tiny_data):
    """The same model, batches and steps in bf16 autocast and in fp32 (weights and AdamW in
    fp32 both times): the first loss within 0.1%, the tenth within 1% (measured here: 5e-5 and
    7e-5 relative), and the bf16 run learns."""
    got = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(tmp_path / dtype, "deepseek", steps=10, dtype=dtype)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block="llama"))
        got[dtype] = [h["train/loss"] for h in Trainer(cfg, data=tiny_data).fit().history]
    assert got["bfloat16"][0] == pytest.approx(got["float32"][0], rel=1e-3)
    assert got["bfloat16"][-1] == pytest.approx(got["float32"][-1], rel=1e-2)
    assert got["bfloat16"][-1] < 0.9 * got["bfloat16"][0]
