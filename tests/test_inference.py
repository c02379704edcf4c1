"""Using a trained model: KV-cache decoding against the full forward, sampling rules, loading
any run directory, moe-eval against the trainer's own evaluation, and the Hugging Face export
against ``transformers``' own models (the oracle: their logits and greedy ``generate()``)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.inference.evaluate import evaluate_tokens, windows
from moe.inference.generate import Sampling, TextStream, generate, next_token
from moe.inference.load import load_run
from moe.model.hf import ExportRefused, architecture
from moe.model.transformer import KVCache, TransformerLM
from moe.training.backend import Backend
from moe.training.data import TokenData, Tokenizer
from moe.training.loop import Trainer
from tests.conftest import tiny_config

LAYERS = {
    "dense": MoEConfig(name="dense"),
    "switch": MoEConfig(name="switch", num_experts=4, dropless=True),
    "deepseek": MoEConfig(
        name="deepseek",
        num_experts=4,
        granularity=2,
        num_shared_experts=1,
        score_func="sigmoid",
        bias_update_rate=0.01,
        dropless=True,
        n_groups=2,
        topk_groups=1,
    ),
}


def _model(block: str, layer: str, seed: int = 0, **model) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_heads=4, n_layers=2, d_ff=64, seq_len=24, block=block, **model)
    m = TransformerLM(cfg, LAYERS[layer]).eval()
    with torch.no_grad():  # a bias that changes choices, so the cache must carry it right
        for mod in m.modules():
            if getattr(mod, "expert_bias_E", None) is not None:
                mod.expert_bias_E.uniform_(-0.2, 0.2)
    return m


# ---------------------------------------------------------------------------------------------
# the KV cache


@pytest.mark.parametrize("block", ["gpt", "llama"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_kv_cache_decode_equals_the_full_forward(block, layer):
    m = _model(block, layer)
    idx = torch.randint(0, 61, (2, 22), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(idx).logits
        cache = KVCache(m, 2)
        pieces = [m(idx[:, :7], cache=cache).logits, m(idx[:, 7:11], cache=cache).logits]  # prefill, then a chunk
        pieces += [m(idx[:, t : t + 1], cache=cache).logits for t in range(11, 22)]  # one token at a time
    assert cache.length == 22
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=2e-5)


def test_kv_cache_refuses_more_positions_than_it_holds():
    m = _model("gpt", "dense")
    cache = KVCache(m, 1)
    with torch.no_grad():
        m(torch.zeros(1, 20, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="longer than the KV cache's 24"):
            m(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="learned positions for 24 tokens"):
        KVCache(m, 1, max_len=48)


@pytest.mark.parametrize("block,layer", [("gpt", "switch"), ("llama", "deepseek")])
def test_greedy_generation_equals_the_argmax_of_a_full_forward_at_every_step(block, layer):
    m = _model(block, layer)
    prompt = [3, 17, 5]
    got = list(generate(m, prompt, 20, Sampling(greedy=True)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):  # the naive loop: the whole sequence again for each token
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_generation_past_seq_len_slides_its_window_and_keeps_going():
    m = _model("llama", "switch")
    got = list(generate(m, [1, 2, 3], 3 * m.cfg.seq_len, Sampling(greedy=True)))
    assert len(got) == 3 * m.cfg.seq_len
    # after the first slide the context is the last seq_len // 2 tokens: the naive loop on that window
    tokens = [1, 2, 3] + got
    cut = m.cfg.seq_len  # tokens[:cut] filled the cache; tokens[cut] was chosen from it
    window = tokens[cut - m.cfg.seq_len // 2 + 1 : cut + 1]
    with torch.no_grad():
        assert int(m(torch.tensor([window])).logits[0, -1].argmax()) == tokens[cut + 1]


def test_generation_stops_after_the_stop_token():
    m = _model("gpt", "dense")
    first = next(generate(m, [4], 1, Sampling(greedy=True)))
    assert list(generate(m, [4], 50, Sampling(greedy=True), stop=first)) == [first]


# ---------------------------------------------------------------------------------------------
# sampling


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert int(next_token(logits, Sampling(greedy=True))) == 0
    assert all(int(next_token(logits, Sampling(top_k=1), g)) == 0 for _ in range(50))
    assert all(int(next_token(logits, Sampling(top_p=0.3), g)) == 0 for _ in range(50))  # p(0) = 0.56 > 0.3
    seen = {int(next_token(logits, Sampling(top_k=2), g)) for _ in range(300)}
    assert seen == {0, 1}
    # top_p = 0.8: the smallest set reaching it is {0, 1, 2} (0.56 + 0.21 = 0.77 < 0.8)
    assert {int(next_token(logits, Sampling(top_p=0.8), g)) for _ in range(500)} == {0, 1, 2}
    # temperature: frequencies follow softmax(logits / T)
    n, t = 20000, 2.0
    draws = torch.tensor([int(next_token(logits, Sampling(temperature=t), g)) for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, (logits[0] / t).softmax(-1), rtol=0, atol=0.015)
    # a seed repeats a sampled generation
    m = _model("llama", "switch")
    a = list(generate(m, [1, 2], 15, Sampling(temperature=1.0), seed=7))
    assert a == list(generate(m, [1, 2], 15, Sampling(temperature=1.0), seed=7))
    assert a != list(generate(m, [1, 2], 15, Sampling(temperature=1.0), seed=8))
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0.0)


def test_text_stream_holds_a_character_until_its_last_byte():
    tok = Tokenizer.byte()
    s = TextStream(tok.decode)
    pieces = [s.add(b) for b in "aé€".encode()]
    assert pieces == ["a", "", "é", "", "", "€"]


# ---------------------------------------------------------------------------------------------
# runs: trained, loaded, scored, exported


def _train(out, layer: str, *, block: str = "llama", steps: int = 10, data=None, **model):
    cfg = tiny_config(out, "dense" if layer == "dense" else "topk", steps=steps)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block=block, **model))
    if layer != "dense":
        cfg = dataclasses.replace(cfg, moe=EXPORT_LAYERS[layer])
    t = Trainer(cfg, data=data)
    t.fit()
    return cfg, t


EXPORT_LAYERS = {
    # switch: top-1, weight = its probability -> Qwen2-MoE without renormalisation
    "switch": MoEConfig(name="switch", num_experts=4, dropless=True, aux_loss_weight=0.01),
    # softmax top-2, renormalised, every block sparse -> Mixtral
    "topk": MoEConfig(name="topk", num_experts=4, top_k=2, dropless=True, aux_loss_weight=0.01),
    # fine-grained + shared + sigmoid + bias + groups + route scale -> GLM-4-MoE
    "deepseek": dataclasses.replace(
        LAYERS["deepseek"], num_experts=4, granularity=2, top_k=1, route_scale=1.5, aux_loss_type="sequence"
    ),
}

# (layer, block, model overrides) -> the architecture it exports as
EXPORTS = {
    "dense-llama": ("dense", "llama", {}, "LlamaForCausalLM"),
    "dense-gpt": ("dense", "gpt", {}, "GPT2LMHeadModel"),
    "switch-llama": ("switch", "llama", {}, "Qwen2MoeForCausalLM"),
    "topk-llama": ("topk", "llama", {}, "MixtralForCausalLM"),
    "topk-llama-every-2nd-untied": ("topk", "llama", {"moe_every": 2, "tie_embeddings": False}, "Qwen2MoeForCausalLM"),
    "deepseek-llama": ("deepseek", "llama", {}, "Glm4MoeForCausalLM"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """One short run of each exported kind, trained once for the module."""
    out = {}
    for name, (layer, block, model, _) in EXPORTS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, *_train(d, layer, block=block, data=tiny_data, **model))
    return out


def _batch(vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(EXPORTS))
def test_a_loaded_run_is_the_trained_model(trained, name):
    run_dir, cfg, t = trained[name]
    run = load_run(run_dir, device="cpu")
    assert run.step == cfg.steps and run.cfg.moe.dropless and not run.model.training
    assert run.tokenizer is not None and run.tokenizer.kind == "byte"
    ours = t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.model(_batch()).logits, ours(_batch()).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(trained, name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe.inference.cli import export_main

    run_dir, cfg, _ = trained[name]
    assert architecture(cfg.model, cfg.moe) == EXPORTS[name][3]
    export_main([str(run_dir), str(tmp_path / "hf")])
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == EXPORTS[name][3]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    run = load_run(run_dir, device="cpu")
    x = _batch()
    with torch.no_grad():
        ours, theirs = run.model(x).logits, hf(x).logits
    # fp32, the same function computed in another order: equal to rounding (measured <= 1e-5)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-5)
    # the tokenizer: AutoTokenizer encodes and decodes as ours does
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return 'héllo' + x  # ünïcödé\n"
    assert tok.encode(text) == run.tokenizer.encode(text)
    assert tok.decode(run.tokenizer.encode(text)) == text
    # greedy decoding: transformers' generate() against moe-generate's
    prompt = [run.tokenizer.eot_id] + run.tokenizer.encode("import os\n")
    want = list(generate(run.model, prompt, 24, Sampling(greedy=True), stop=run.tokenizer.eot_id))
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    assert got == want


def test_refused_exports_name_the_reason_and_what_to_train():
    def refused(block="llama", **moe):
        model = ModelConfig(
            vocab_size=64,
            n_layers=4,
            moe_every=moe.pop("moe_every", 1),
            block=block,
            activation=moe.pop("activation", "auto"),
        )
        with pytest.raises(ExportRefused) as e:
            architecture(model, MoEConfig(**moe))
        return str(e.value)

    assert "model.block=llama" in refused(block="gpt", name="switch", num_experts=4)
    assert "BASE" in refused(name="base", num_experts=4)
    assert "moe.score_func=sigmoid" in refused(name="topk", num_experts=4, bias_update_rate=0.01)
    assert "moe.score_func=sigmoid" in refused(name="topk", num_experts=4, num_shared_experts=1)
    assert "model.moe_every=1" in refused(
        name="deepseek", num_experts=4, score_func="sigmoid", normalize_weights=False, moe_every=2
    )
    assert "swiglu" in refused(name="dense", activation="gelu")


def test_a_refused_export_is_one_line_and_writes_nothing(tmp_path, tiny_data, capsys):
    from moe.inference.cli import export_main

    cfg = tiny_config(tmp_path / "run", "base", steps=5)
    Trainer(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block="llama")), data=tiny_data).fit()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "run"), str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("moe-export: error:") and "BASE" in err and "moe=topk" in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf*"))


def test_moe_eval_gives_the_trainers_evaluation_on_the_same_tokens(trained, tmp_path, capsys):
    """The trainer's evaluation (Backend.evaluate: random windows of the val split) on a val
    split of exactly one window is that window's loss; moe-eval on a file holding those
    tokens must give it."""
    from moe.inference.cli import eval_main

    run_dir, cfg, t = trained["deepseek-llama"]
    text = "x = [i * 2 for i in range(10)]  # doubled\nprint(sum(x))\n"
    text = (text * 3)[: cfg.model.seq_len - 1]  # end-of-text, seq_len - 1 bytes, end-of-text: seq_len + 1 tokens
    (tmp_path / "val.py").write_text(text)
    stream = np.frombuffer(b"\0" + text.encode() + b"\0", dtype=np.uint8).astype(np.int64)
    data = TokenData(train=stream, val=stream, vocab_size=256, tokenizer=Tokenizer.byte())
    backend = Backend(cfg, data=data)
    backend.model.load_state_dict(t.model.state_dict())
    want = backend.evaluate(3)
    eval_main([str(run_dir), "--data", str(tmp_path / "val.py"), "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tokens"] == cfg.model.seq_len
    assert r["loss"] == pytest.approx(want, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(want), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(want * cfg.model.seq_len / math.log(2) / (len(text) + 1), rel=1e-6)
    # each MoE layer's load counts every token's routed choices once (4 fine-grained of 8, top-2)
    assert set(r["expert_load"]) == {"0", "1"}
    assert all(sum(c) == cfg.model.seq_len * 2 and len(c) == 8 for c in r["expert_load"].values())
    out = capsys.readouterr().out
    assert "perplexity" in out and "layer   1" in out


def test_evaluation_windows_predict_every_token_once():
    for n, s in [(2, 8), (9, 8), (10, 8), (100, 7)]:
        spans = windows(n, s)
        targets = [t for start, length in spans for t in range(start + 1, start + length + 1)]
        assert targets == list(range(1, n))
    m = _model("llama", "switch")
    tokens = np.random.default_rng(0).integers(0, 61, 70)
    r = evaluate_tokens(m, tokens, seq_len=24, batch_size=2)
    with torch.no_grad():  # the oracle: every prefix's next-token loss, one window at a time
        nll = sum(
            torch.nn.functional.cross_entropy(
                m(torch.from_numpy(tokens[None, s : s + n])).logits[0],
                torch.from_numpy(tokens[s + 1 : s + n + 1]),
                reduction="sum",
            ).item()
            for s, n in windows(70, 24)
        )
    assert r["tokens"] == 69 and r["loss"] == pytest.approx(nll / 69, rel=1e-6)


def test_moe_eval_and_generate_refuse_with_one_line(tmp_path, trained, capsys):
    from moe.inference.cli import eval_main, generate_main

    run_dir = trained["switch-llama"][0]
    for main, argv, want in [
        (eval_main, [str(tmp_path / "nope"), "--data", "x"], "does not exist"),
        (eval_main, [str(run_dir), "--data", str(tmp_path / "missing.txt")], "--data"),
        (generate_main, [str(tmp_path), "--prompt", "x"], "holds no checkpoint"),
        (generate_main, [str(run_dir), "--top-p", "0"], "top_p"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and want in err, err


def test_moe_generate_streams_text_and_reports_its_speed(trained, capsys):
    from moe.inference.cli import generate_main

    run_dir = trained["deepseek-llama"][0]
    generate_main([str(run_dir), "--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3"])
    out, err = capsys.readouterr()
    assert out.startswith("def f(") and "tokens/s" in err
    generate_main([str(run_dir), "--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3"])
    assert capsys.readouterr().out == out  # a seed repeats it


# ---------------------------------------------------------------------------------------------
# import: a Hugging Face Llama as the dense model upcycling starts from


@pytest.mark.slow
def test_upcycling_from_an_exported_llama_equals_upcycling_from_its_run(trained, tmp_path, tiny_data):
    from moe.inference.export import export_run

    run_dir, cfg, _ = trained["dense-llama"]
    export_run(run_dir, tmp_path / "hf")
    models = {}
    for name, src in (("run", run_dir), ("hf", tmp_path / "hf")):
        c = dataclasses.replace(
            tiny_config(tmp_path / name, "topk", steps=5),
            model=cfg.model,
            moe=MoEConfig(name="topk", num_experts=4, top_k=2, dropless=True),
            init_from=str(src),
        )
        t = Trainer(c, data=tiny_data)
        models[name] = t.model.state_dict()
    assert set(models["run"]) == set(models["hf"])
    for k, v in models["run"].items():
        assert torch.equal(v, models["hf"][k]), k


def test_a_hugging_face_model_of_another_shape_or_kind_is_refused(tmp_path, trained, tiny_data):
    from moe.inference.export import export_run

    run_dir, cfg, _ = trained["dense-llama"]
    export_run(run_dir, tmp_path / "hf")
    bad = dataclasses.replace(
        tiny_config(tmp_path / "a", "topk", steps=5),
        model=dataclasses.replace(cfg.model, d_ff=256),
        moe=MoEConfig(name="topk", num_experts=4, top_k=2),
        init_from=str(tmp_path / "hf"),
    )
    with pytest.raises(ConfigError, match="model.d_ff: 128 -> 256"):
        Trainer(bad, data=tiny_data)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, "num_key_value_heads": 2}))
    with pytest.raises(ConfigError, match="grouped-query attention"):
        Trainer(dataclasses.replace(bad, model=cfg.model), data=tiny_data)


def test_export_never_replaces_its_own_run_and_cleans_up(trained, tmp_path, capsys):
    from moe.inference.cli import export_main

    run_dir = trained["dense-llama"][0]
    for out in (run_dir, run_dir.parent):
        with pytest.raises(SystemExit):
            export_main([str(run_dir), str(out), "--overwrite"])
        assert "is the run directory or holds it" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        export_main([str(run_dir), str(tmp_path / "a-file")])
    assert "is a file" in capsys.readouterr().err
    export_main([str(run_dir), str(tmp_path / "hf")])
    export_main([str(run_dir), str(tmp_path / "hf"), "--overwrite"])  # replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "hf"]  # no temporaries left


def test_a_literal_end_of_text_in_text_stays_text_in_the_exported_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from moe.inference.export import write_tokenizer

    texts = ["def f(x): return x\n" * 20, "a<|endoftext|>b élan"]
    ours = Tokenizer.train_bpe(texts, 300)
    write_tokenizer(ours, tmp_path, 64)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for t in texts:
        assert theirs.encode(t) == ours.encode(t)
    assert ours.eot_id not in ours.encode(texts[1])


UNTRAINED = {
    # GLM-4-MoE without shared experts (transformers builds them 0 wide), unnormalised sigmoid top-1
    "sigmoid-top1-no-shared": (
        dict(moe_every=1),
        dict(name="topk", num_experts=4, score_func="sigmoid", normalize_weights=False, bias_update_rate=0.01),
    ),
    # 4 groups of 2, the best 2 groups, a route scale, 2 shared experts, dense block first
    "deepseek-groups-scale-dense-first": (
        dict(moe_every=2),
        dict(
            name="deepseek",
            num_experts=4,
            granularity=2,
            top_k=1,
            num_shared_experts=2,
            score_func="sigmoid",
            bias_update_rate=0.01,
            n_groups=4,
            topk_groups=2,
            route_scale=2.5,
        ),
    ),
    # GShard's top-2 (renormalised; random routing is training-only) with dense blocks between: Qwen2-MoE
    "gshard-every-2nd": (dict(moe_every=2, n_layers=4), dict(name="gshard", num_experts=4)),
}


@pytest.mark.parametrize("name", list(UNTRAINED))
def test_more_layouts_export_exactly(name, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moe.model.hf import hf_config, to_hf

    model_over, moe = UNTRAINED[name]
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_heads=4, d_ff=64, seq_len=32, block="llama", **{"n_layers": 2, **model_over}
    )
    ours = TransformerLM(cfg, MoEConfig(dropless=True, **moe)).eval()
    with torch.no_grad():
        for b in ours.buffers():  # an expert bias that changes choices
            b.uniform_(-0.3, 0.3)
    arch = architecture(cfg, ours.moe)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, ours.moe, arch, eos_token_id=0)))
    save_file(
        {k: v.contiguous() for k, v in to_hf(ours.state_dict(), cfg, ours.moe, arch).items()},
        str(tmp_path / "model.safetensors"),
    )
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, ours(x).logits, rtol=0, atol=5e-5)
