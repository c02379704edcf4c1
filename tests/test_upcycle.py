"""Sparse upcycling (``init_from``): the MoE model built from a trained dense one.

The oracle is the dense model itself: where the routing sums each token's weights over its
copies to one, the upcycled model's step-0 logits are the dense model's.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from moe.config import ConfigError, MoEConfig
from moe.model.transformer import TransformerLM
from moe.training import checkpoint as ckpt
from moe.training.loop import Trainer
from moe.training.upcycle import exact_start, upcycle_
from tests.conftest import tiny_config


def _dense_run(tmp_path_factory, tiny_data, block: str):
    out = tmp_path_factory.mktemp(f"dense-{block}")
    cfg = tiny_config(out, "dense", steps=6)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block=block))
    t = Trainer(cfg, data=tiny_data)
    t.fit()
    return out, t.model


@pytest.fixture(scope="module")
def dense_gpt(tmp_path_factory, tiny_data):
    return _dense_run(tmp_path_factory, tiny_data, "gpt")


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory, tiny_data):
    return _dense_run(tmp_path_factory, tiny_data, "llama")


def _moe_cfg(out, src, block: str, **moe):
    cfg = tiny_config(out, "topk", steps=6)
    base = dict(name="topk", num_experts=4, top_k=2, dropless=True, aux_loss_weight=0.01)
    base.update(moe)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, block=block), moe=MoEConfig(**base), init_from=str(src)
    )


EXACT = {
    "topk-2": dict(),
    "gshard": dict(name="gshard", top_k=2, random_routing=False),
    "fine-grained-x2-top1": dict(top_k=1, granularity=2, route_scale=2.0),
    "deepseek": dict(
        name="deepseek",
        top_k=1,
        granularity=4,
        route_scale=4.0,
        num_shared_experts=1,
        score_func="sigmoid",
        bias_update_rate=0.001,
        aux_loss_type="sequence",
    ),
}


@pytest.mark.parametrize("block", ["gpt", "llama"])
@pytest.mark.parametrize("case", list(EXACT))
def test_upcycled_step0_logits_equal_the_dense_models(request, tmp_path, tiny_data, block, case):
    src, dense = request.getfixturevalue(f"dense_{block}")
    t = Trainer(_moe_cfg(tmp_path, src, block, **EXACT[case]), data=tiny_data)
    assert exact_start(t.cfg.moe)[0]
    x = torch.randint(0, dense.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    dense.eval(), t.model.eval()
    with torch.no_grad():
        want, got = dense(x).logits, t.model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "step 0 computes the dense model's function" in t.backend.init_note
    # the routers are fresh, not zero, and the model still trains from here
    assert t.model.blocks[0].ffn.router.weight_ED.abs().sum() > 0
    res = t.fit()
    assert res.step == 6 and all(torch.isfinite(torch.tensor(h["train/loss"])) for h in res.history)


def test_every_expert_is_a_slice_of_the_dense_ffn(dense_llama, tmp_path, tiny_data):
    src, dense = dense_llama
    t = Trainer(
        _moe_cfg(tmp_path, src, "llama", num_experts=3, top_k=1, granularity=2, route_scale=2.0), data=tiny_data
    )
    ffn, moe = dense.blocks[1].ffn, t.model.blocks[1].ffn
    F2 = ffn.w1.weight.shape[0] // 2
    for e in range(6):
        j = e % 2
        assert torch.equal(moe.experts.w1_EDF[e], ffn.w1.weight[j * F2 : (j + 1) * F2].t())
        assert torch.equal(moe.experts.w3_EDF[e], ffn.w3.weight[j * F2 : (j + 1) * F2].t())
        assert torch.equal(moe.experts.w2_EFD[e], ffn.w2.weight[:, j * F2 : (j + 1) * F2].t())
    w = moe.router.weight_ED
    assert torch.equal(w[0], w[1]) and torch.equal(w[4], w[5]) and not torch.equal(w[1], w[2])
    assert torch.equal(t.model.tok_emb.weight, dense.tok_emb.weight)
    assert torch.equal(t.model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


def test_switch_upcycles_but_says_its_start_is_not_the_dense_function(dense_gpt, tmp_path, tiny_data):
    src, dense = dense_gpt
    t = Trainer(_moe_cfg(tmp_path, src, "gpt", name="switch", top_k=1), data=tiny_data)
    assert "not the dense model's function: moe=switch" in t.backend.init_note
    x = torch.randint(0, dense.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    t.model.eval()
    with torch.no_grad():
        assert not torch.allclose(t.model(x).logits, dense.eval()(x).logits, atol=1e-3)


def test_upcycling_refuses_another_shape_a_moe_source_and_a_missing_dir(dense_gpt, tmp_path, tiny_data):
    src, _ = dense_gpt
    cfg = _moe_cfg(tmp_path / "a", src, "gpt")
    wide = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=256))
    with pytest.raises(ConfigError, match=r"model.d_ff: 128 -> 256"):
        Trainer(wide, data=tiny_data)
    with pytest.raises(ConfigError, match=r"model.block: 'gpt' -> 'llama'"):
        Trainer(_moe_cfg(tmp_path / "b", src, "llama"), data=tiny_data)
    with pytest.raises(ConfigError, match="upcycled experts are copies of the dense FFN"):
        Trainer(_moe_cfg(tmp_path / "g", src, "gpt", name="gshard", expert_d_ff=64), data=tiny_data)
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(_moe_cfg(tmp_path / "c", tmp_path / "nowhere", "gpt"), data=tiny_data)
    moe_run = tmp_path / "moe-run"
    Trainer(tiny_config(moe_run, "switch", steps=5), data=tiny_data).fit()
    with pytest.raises(ConfigError, match="upcycling starts from a dense model"):
        Trainer(_moe_cfg(tmp_path / "d", moe_run, "gpt"), data=tiny_data)
    (tmp_path / "pp").mkdir()
    (tmp_path / "pp" / "pipeline.json").write_text("{}")
    with pytest.raises(ConfigError, match="pipeline-parallel run"):
        Trainer(_moe_cfg(tmp_path / "e", tmp_path / "pp", "gpt"), data=tiny_data)


def test_a_resumed_upcycled_run_needs_the_dense_checkpoint_no_more(dense_gpt, tmp_path, tiny_data):
    src, _ = dense_gpt
    copy = tmp_path / "dense-copy"
    shutil.copytree(src, copy)
    cfg = _moe_cfg(tmp_path / "run", copy, "gpt")
    Trainer(cfg, data=tiny_data).fit(stop_after=2)
    shutil.rmtree(copy)
    t = Trainer(cfg, data=tiny_data)  # resumes its own checkpoint: init_from is not read
    assert t.backend.init_note == ""
    assert t.fit().step == 6


def test_upcycle_copies_only_this_ranks_shard():
    """A model holding experts [2, 4) of 4 (an EP rank's shard) gets those experts' slices."""
    from moe.config import ModelConfig
    from moe.model.layers import LayerContext

    cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_ff=16, vocab_size=11, seq_len=8, moe_every=1)
    dense = TransformerLM(cfg, MoEConfig(name="dense"))
    moe = MoEConfig(name="topk", num_experts=2, top_k=2, granularity=2, route_scale=2.0)
    from moe.model.dispatch import LocalDispatcher

    class HalfDispatcher(LocalDispatcher):
        def expert_shard(self, E):
            return E // 2, E // 2

    model = TransformerLM(cfg, moe, context=LayerContext(dispatcher=HalfDispatcher()))
    upcycle_(model, dense.state_dict(), moe)
    w1 = dense.blocks[0].ffn.w1.weight.t()  # (D, F)
    ex = model.blocks[0].ffn.experts
    assert ex.first_expert == 2 and ex.num_experts == 2
    assert torch.equal(ex.w1_EDF[0], w1[:, :8]) and torch.equal(ex.w1_EDF[1], w1[:, 8:])  # experts 2, 3: copy 1


def test_ep2_upcycled_start_equals_one_process(pair, dense_gpt, tmp_path, tiny_data):
    """Each of the two ranks copies the dense FFN into its shard: the gathered start-up state
    and the first steps equal the one-process upcycled run (fine-grained: each rank's slices)."""
    from tests.test_parallel_train import (
        NO_AUX,
        B,
        _assert_same_run,
        _assert_states_close,
        _cfg,
        _reference,
        case_fit,
    )

    src, _ = dense_gpt

    def cfg(d, **kw):
        c = _cfg(d, "topk", steps=3, aux_loss_weight=0.0, **kw)  # (a batch-wide aux loss is per rank)
        c = dataclasses.replace(c, moe=dataclasses.replace(c.moe, granularity=2, route_scale=2.0))
        return dataclasses.replace(c, init_from=str(src))

    par = pair.run(case_fit, cfg=cfg(tmp_path / "ep", ep=2, world=2), data=tiny_data)[0]
    ref = _reference(cfg(tmp_path / "ref", batch_size=2 * B), tiny_data)
    _assert_states_close(par["init"], ref["init"], rtol=0, atol=0)
    _assert_same_run(par, ref, keys=NO_AUX)
    dense = ckpt.load(src / "checkpoint.pt")["model"]
    assert torch.equal(ref["init"]["tok_emb.weight"], dense["tok_emb.weight"])


def test_a_dense_checkpoint_from_before_the_block_option_upcycles(dense_gpt, tmp_path, tiny_data):
    """Its config has no model.block / rope_theta / norm_eps and says activation=gelu: it ran
    as today's defaults do, so it is accepted; a llama source of another rope base is not."""
    src, dense = dense_gpt
    state = ckpt.load(src / "checkpoint.pt")
    for k in ("block", "rope_theta", "norm_eps"):
        state["config"]["model"].pop(k)
    state["config"]["model"]["activation"] = "gelu"
    old = tmp_path / "old.pt"
    torch.save(state, old)
    t = Trainer(_moe_cfg(tmp_path / "a", old, "gpt"), data=tiny_data)
    assert torch.equal(t.model.tok_emb.weight, dense.tok_emb.weight)
    other = _moe_cfg(tmp_path / "b", old, "gpt")
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, norm_eps=1e-6))
    with pytest.raises(ConfigError, match=r"model.norm_eps: 1e-05 -> 1e-06"):
        Trainer(other, data=tiny_data)


def test_exact_start_names_what_breaks_it():
    assert exact_start(MoEConfig(name="dense")) == (True, "")
    assert exact_start(MoEConfig(name="gshard", top_k=2, random_routing=False, dropless=True)) == (True, "")
    ok, why = exact_start(MoEConfig(name="gshard", top_k=2, random_routing=True))
    assert not ok and "random_routing" in why
    ok, why = exact_start(MoEConfig(name="deepseek", top_k=1, granularity=4, score_func="sigmoid"))
    assert not ok and "route_scale=1.0 is not the granularity 4" in why
