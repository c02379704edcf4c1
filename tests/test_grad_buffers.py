"""Expert weight gradients accumulated straight into allocated ``.grad`` buffers (the
trainer zeroes gradients in place) equal autograd's own, across micro-batches, for both
execution paths; gradient hooks still run."""

from __future__ import annotations

import copy

import pytest
import torch

from moe.config import MoEConfig
from moe.model.experts import GroupedExperts
from moe.model.layers import MoELayer


def _layer(dropless: bool, into_grad: bool = True) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(
        8, 16, MoEConfig(name="topk", num_experts=4, top_k=2, dropless=dropless, capacity_factor=1.0)
    ).double()
    layer.experts.grad_into_buffers = into_grad
    return layer


@pytest.mark.parametrize("path", ["grouped", "padded", "capacity"])
def test_in_place_accumulation_equals_fresh_gradients(path, monkeypatch):
    monkeypatch.setattr(GroupedExperts, "PAD_RATIO", {"grouped": 0.0, "padded": 1e9, "capacity": 1.1}[path])
    layer = _layer(dropless=path != "capacity")
    ref = copy.deepcopy(layer)
    xs = [torch.randn(2, 12, 8, dtype=torch.float64) for _ in range(3)]

    def fresh_sums(m):  # every micro-batch into a fresh .grad (autograd's own path), summed by hand
        grads = []
        for step in range(2):
            total = {}
            for x in xs[step : step + 2]:
                m.zero_grad(set_to_none=True)
                m(x)[0].pow(2).sum().backward()
                for n, p in m.named_parameters():
                    total[n] = total.get(n, 0) + p.grad.clone()
            grads.append(total)
        return grads

    def held_buffers(m):  # two optimizer steps of two micro-batches, .grad zeroed in place
        grads = []
        m(xs[0])[0].sum().backward()  # allocate every .grad once
        for step in range(2):
            m.zero_grad(set_to_none=False)
            for x in xs[step : step + 2]:
                m(x)[0].pow(2).sum().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        return grads

    fresh = fresh_sums(ref)
    held = held_buffers(layer)
    for a, b in zip(fresh, held):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)
    assert layer.experts.w1_EDF.grad.abs().sum() > 0


def test_post_accumulate_hook_sees_the_whole_gradient():
    layer = _layer(dropless=True)
    layer.zero_grad(set_to_none=False)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    layer(x)[0].pow(2).sum().backward()  # allocates .grad
    expected = layer.experts.w2_EFD.grad.clone() * 2
    seen = []
    layer.experts.w2_EFD.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    layer(x)[0].pow(2).sum().backward()  # accumulates into it
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("dropless", [True, False])
def test_off_by_default_so_autograd_grad_is_right_with_grad_allocated(dropless):
    layer = _layer(dropless, into_grad=False)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    layer(x)[0].sum().backward()  # .grad allocated
    before = layer.experts.w1_EDF.grad.clone()
    loss = layer(x)[0].pow(2).sum()
    (g,) = torch.autograd.grad(loss, [layer.experts.w1_EDF])
    ref = _layer(dropless, into_grad=False)
    (g_ref,) = torch.autograd.grad(ref(x)[0].pow(2).sum(), [ref.experts.w1_EDF])
    torch.testing.assert_close(g, g_ref)
    assert g.abs().sum() > 0
    torch.testing.assert_close(layer.experts.w1_EDF.grad, before)  # .grad untouched


def test_trainer_turns_it_on(tmp_path, tiny_data):
    from moe.training.loop import Trainer
    from tests.conftest import tiny_config

    t = Trainer(tiny_config(tmp_path), data=tiny_data)
    flags = [m.grad_into_buffers for m in t.model.modules() if isinstance(m, GroupedExperts)]
    assert flags and all(flags)
