"""Expert parallelism: EP=2 over two real gloo processes equals EP=1, outputs AND gradients.

The check DeepSpeed's MoE suite makes.  One pair of worker processes (spawned once for the
module, 1 torch thread each, 127.0.0.1) runs every case; each worker computes the EP=1
reference itself (one process holding all E experts, the same weights, both ranks' tokens)
and compares:

- outputs and input gradients of its own tokens;
- router gradients: raw (its own tokens' loss only: the router is replicated) and after
  ``allreduce_gradients`` (the mean over both ranks);
- expert gradients of its shard: raw (both ranks' tokens reach the shard through the
  all-to-all) against the matching slice of the reference's, and after ``allreduce_gradients``.

References.  Dropless routing of a token does not depend on the other tokens, so the
reference runs the union of both ranks' tokens through one layer.  Capacity depends on the
token count: each rank computes C from its own T (T differs between the ranks here, so the
capacities do too), so the reference runs each rank's tokens separately, all E experts local,
and sums the expert gradients.  BASE balances over all tokens of the group, so its reference
is the union.  The reference router computes its fp32 logits per rank's rows (a matmul's rows
can round differently with a different number of rows; routing decisions must see the very
same scores).  Tolerance: fp32, ``rtol = atol = 1e-5``.

Every wait is bounded: a hung collective fails the test (gloo timeout 60 s, then the case
timeout), it does not hang the run.
"""

from __future__ import annotations

import copy
import multiprocessing
import queue
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model.auction import balanced_capacities
from moe.model.dispatch import LocalDispatcher
from moe.model.experts import GroupedExperts, expert_parameters, split_parameters
from moe.model.layers import MoELayer
from moe.model.routing import expert_capacity
from moe.model.transformer import TransformerLM
from moe.parallel import (
    AllToAllDispatcher,
    ParallelState,
    allreduce_gradients,
    check_expert_sharding,
    check_parallel_sizes,
    ddp,
    rank_groups,
)
from moe.parallel.ports import free_port

WORLD = 2
D, FF = 8, 12
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32
SIZES = (9, 6)  # tokens on rank 0 and rank 1 (unequal: unequal capacities)
CASE_TIMEOUT = 240.0  # s for one case on both ranks (the machine may be busy)
START_TIMEOUT = 240.0


# ---------------------------------------------------------------------------------------------
# the worker pair


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        states = {
            ep: ParallelState.build(ep_size=ep, timeout=timedelta(seconds=60)) for ep in (1, 2, 4) if world % ep == 0
        }
        results.put((rank, True, "ready"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, kwargs = task
        try:
            results.put((rank, True, fn(rank, states, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    del states  # so stop() frees every group before the worker exits
    ddp.stop()


class WorkerPair:
    """``world`` (default two) spawned ranks that run case functions ``fn(rank, states, **kwargs)`` in lockstep.
    After a timeout, or an error inside a collective (a rank that failed mid-case leaves the
    collectives out of step, and the other rank then fails on the gloo timeout), the pair is
    torn down and the next case starts a fresh one."""

    def __init__(self, world: int = WORLD):
        self.world = world
        self.procs: list = []

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, self.world, port, self.tasks[r], self.results), daemon=True)
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()
        self._collect(START_TIMEOUT, "start-up")

    def _collect(self, timeout: float, what: str) -> list:
        out: list = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                pytest.fail(f"{what}: no answer from a rank within {timeout:.0f} s (hang?)")
            out[rank] = value
            if not ok:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            if any("distributed" in e for e in errors):  # failed in a collective: out of step
                self.stop()
            pytest.fail(f"{what} failed\n" + "\n".join(errors))
        return out

    def run(self, fn, **kwargs) -> list:
        if not self.procs:
            self._start()
        for q in self.tasks:
            q.put((fn, kwargs))
        return self._collect(CASE_TIMEOUT, fn.__name__)

    def stop(self) -> None:
        procs, self.procs = self.procs, []
        for q in self.tasks if procs else []:
            try:
                q.put(None)
            except Exception:
                pass
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


@pytest.fixture(scope="module")
def pair():
    w = WorkerPair()
    yield w
    w.stop()


# ---------------------------------------------------------------------------------------------
# case helpers (run inside the workers)


def _cfg(name: str, E: int, k: int, dropless: bool, **extra) -> MoEConfig:
    base = dict(
        name=name,
        num_experts=E,
        top_k=k,
        dropless=dropless,
        capacity_factor=0.75,
        eval_capacity_factor=0.75,
        min_capacity=0,
        jitter_eps=0.0,
    )
    return MoEConfig(**{**base, **extra})


def _tokens(sizes, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, D, generator=gen) for t in sizes]


class _Recording(AllToAllDispatcher):
    """Keeps the last plan, to look at what crossed the group."""

    def dispatch(self, x_TD, routing):
        x, self.last_plan = super().dispatch(x_TD, routing)
        self.last_received = x.shape[0] if self.last_plan.counts is not None else x.shape[0] * x.shape[1]
        return x, self.last_plan


def _layers(cfg: MoEConfig, dispatcher, seed: int, router_weight: torch.Tensor | None):
    """The EP=1 reference (all E experts) and the layer under test, same weights.  Both are
    built from the same seed, so the shard's init must already match the reference's slice."""
    torch.manual_seed(seed)
    ref = MoELayer(D, FF, cfg)
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, cfg, dispatcher=dispatcher)
    first, n = layer.experts.first_expert, layer.experts.num_experts
    assert torch.equal(layer.experts.w1_EDF, ref.experts.w1_EDF[first : first + n]), (
        "shard init != slice of the full init"
    )
    assert torch.equal(layer.experts.w2_EFD, ref.experts.w2_EFD[first : first + n])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights far from the small init: routing and outputs far from 0
        if router_weight is None:
            ref.router.weight_ED.normal_(0.0, 1.0, generator=gen)
        else:
            ref.router.weight_ED.copy_(router_weight)
        ref.experts.w1_EDF.normal_(0.0, 0.5, generator=gen)
        ref.experts.w2_EFD.normal_(0.0, 0.5, generator=gen)
        layer.router.weight_ED.copy_(ref.router.weight_ED)
        layer.experts.w1_EDF.copy_(ref.experts.w1_EDF[first : first + n])
        layer.experts.w2_EFD.copy_(ref.experts.w2_EFD[first : first + n])
    return ref, layer, first, n


def _ref_grads(ref: MoELayer, xs, gs, mode: str, rng_seed: int, ep_size: int):
    """Per rank q: output rows y_q and the gradients of L_q = sum(y_q * g_q) with respect to
    x_q, the router and the (full) expert weights.  "union": one forward over the tokens of
    each expert-parallel group (BASE balances within a group); "per_rank": one per rank."""
    params = [ref.router.weight_ED, ref.experts.w1_EDF, ref.experts.w2_EFD]
    out = []
    if mode == "union":
        route = ref.router.forward  # logits per rank's rows, as the ranks compute them
        for g in range(0, len(xs), ep_size):
            xs_g, gs_g = xs[g : g + ep_size], gs[g : g + ep_size]
            sizes = [x.shape[0] for x in xs_g]
            ref.router.forward = lambda x_TD: torch.cat([route(c) for c in x_TD.split(sizes)])
            x_all = torch.cat(xs_g).requires_grad_(True)
            y_all, _ = ref(x_all)
            del ref.router.forward
            for q, y_q in enumerate(y_all.split(sizes)):
                gx, *gp = torch.autograd.grad((y_q * gs_g[q]).sum(), [x_all, *params], retain_graph=True)
                out.append((y_q.detach(), gx.split(sizes)[q], gp))
    else:
        for q, x in enumerate(xs):
            x = x.clone().requires_grad_(True)
            torch.manual_seed(rng_seed + q)  # GShard's random routing draws the same as rank q
            y_q, _ = ref(x)
            gx, *gp = torch.autograd.grad((y_q * gs[q]).sum(), [x, *params])
            out.append((y_q.detach(), gx, gp))
    return out


def case_equivalence(
    rank,
    states,
    *,
    name,
    E,
    k,
    dropless,
    mode,
    ep=2,
    sizes=SIZES,
    extra=None,
    router_weight=None,
    tokens=None,
    training=True,
    seed=0,
):
    """One forward and backward of the layer under test on this rank vs the EP=1 reference."""
    state = states[ep]
    cfg = _cfg(name, E, k, dropless, **(extra or {}))
    disp = _Recording(state)
    xs = [torch.tensor(t) for t in tokens] if tokens is not None else _tokens(sizes, seed + 2)
    router_weight = None if router_weight is None else torch.tensor(router_weight)
    ref, layer, first, n = _layers(cfg, disp, seed, router_weight)
    ref.train(training)
    layer.train(training)
    gs = _tokens([x.shape[0] for x in xs], seed + 3)
    rng_seed = 1000

    x = xs[rank].clone().requires_grad_(True)
    torch.manual_seed(rng_seed + rank)
    y, aux = layer(x)
    (y * gs[rank]).sum().backward()
    raw = [
        x.grad.clone(),
        layer.router.weight_ED.grad.clone(),
        layer.experts.w1_EDF.grad.clone(),
        layer.experts.w2_EFD.grad.clone(),
    ]
    allreduce_gradients(layer, state)
    counts_total = aux.counts_E.clone()
    dist.all_reduce(counts_total)  # the last collective: the checks below may fail on one rank only

    refs = _ref_grads(ref, xs, gs, mode, rng_seed, state.ep_size)
    y_ref, gx_ref, (gr_ref, g1_ref, g2_ref) = refs[rank]
    torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(raw[0], gx_ref, **TOL, msg=lambda m: f"input grad: {m}")
    torch.testing.assert_close(raw[1], gr_ref, **TOL, msg=lambda m: f"router grad (own tokens): {m}")
    group = state.ep_ranks  # whose tokens reach this shard
    shard = slice(first, first + n)
    g1_group = sum(refs[q][2][1] for q in group)[shard]
    g2_group = sum(refs[q][2][2] for q in group)[shard]
    torch.testing.assert_close(raw[2], g1_group, **TOL, msg=lambda m: f"w1 grad (raw shard): {m}")
    torch.testing.assert_close(raw[3], g2_group, **TOL, msg=lambda m: f"w2 grad (raw shard): {m}")
    # after allreduce_gradients: the gradient of the mean of the ranks' losses, for every parameter
    W = len(refs)
    torch.testing.assert_close(
        layer.router.weight_ED.grad, sum(r[2][0] for r in refs) / W, **TOL, msg=lambda m: f"router grad (reduced): {m}"
    )
    torch.testing.assert_close(
        layer.experts.w1_EDF.grad,
        (sum(r[2][1] for r in refs) / W)[shard],
        **TOL,
        msg=lambda m: f"w1 grad (reduced): {m}",
    )
    torch.testing.assert_close(
        layer.experts.w2_EFD.grad,
        (sum(r[2][2] for r in refs) / W)[shard],
        **TOL,
        msg=lambda m: f"w2 grad (reduced): {m}",
    )

    # load statistics stay this rank's own (BASE's training assignment is the group's: skip)
    if name != "base" or not training:
        with torch.no_grad():
            torch.manual_seed(rng_seed + rank)
            _, aux_ref = ref(xs[rank])
        torch.testing.assert_close(aux.counts_E, aux_ref.counts_E, rtol=0, atol=0)
        torch.testing.assert_close(aux.num_dropped, aux_ref.num_dropped, rtol=0, atol=0)
        torch.testing.assert_close(aux.aux_loss, aux_ref.aux_loss, **TOL)
        torch.testing.assert_close(aux.z_loss, aux_ref.z_loss, **TOL)
    expert_grad_zero = [
        bool((layer.experts.w1_EDF.grad[e] == 0).all() and (layer.experts.w2_EFD.grad[e] == 0).all()) for e in range(n)
    ]
    return {
        "counts_E": aux.counts_E.tolist(),
        "counts_total": counts_total.tolist(),
        "num_dropped": aux.num_dropped.item(),
        "received": disp.last_received,
        "send_splits": disp.last_plan.send_splits,
        "recv_splits": disp.last_plan.recv_splits,
        "expert_grad_zero": expert_grad_zero,
        "first": first,
    }


# ---------------------------------------------------------------------------------------------
# EP=2 == EP=1, every router family, both modes

CASES = [
    # name, E, k, dropless, reference, extra cfg
    ("switch", 4, 1, True, "union", {}),
    ("switch", 4, 1, False, "per_rank", {}),
    ("switch", 2, 1, True, "union", {}),  # one expert per rank: no reordering of received rows
    ("switch", 2, 1, False, "per_rank", {}),
    ("gshard", 4, 2, True, "union", {"random_routing": False}),
    ("gshard", 4, 2, False, "per_rank", {"random_routing": False}),
    ("gshard", 4, 2, False, "per_rank", {"random_routing": True}),  # RNG seeded as the reference's
    ("topk", 4, 3, True, "union", {"normalize_weights": False}),
    ("topk", 4, 3, False, "per_rank", {}),
    ("base", 4, 1, True, "union", {"aux_loss_weight": 0.0}),
    ("base", 8, 1, True, "union", {"aux_loss_weight": 0.0}),  # 4 experts per rank
]


@pytest.mark.parametrize(
    "name, E, k, dropless, mode, extra",
    CASES,
    ids=[
        f"{c[0]}-E{c[1]}-{'dropless' if c[3] else 'capacity'}{'-rr' if c[5].get('random_routing') else ''}"
        for c in CASES
    ],
)
def test_ep2_equals_ep1(pair, name, E, k, dropless, mode, extra):
    r0, r1 = pair.run(case_equivalence, name=name, E=E, k=k, dropless=dropless, mode=mode, extra=extra)
    assert (r0["first"], r1["first"]) == (0, E // 2)
    assert r0["send_splits"][1] == r1["recv_splits"][0] and r1["send_splits"][0] == r0["recv_splits"][1]
    if name == "base":  # balanced over all 15 tokens of the group, not per rank
        assert r0["counts_total"] == balanced_capacities(sum(SIZES), E).float().tolist()
    if not dropless and name != "base":  # each rank's C from its own T: here they differ
        caps = [E // 2 * expert_capacity(T, E, k, 0.75, 0) for T in SIZES]
        # only kept rows travel (no padded slots): at most each source's capacity
        assert all(r <= c for r, c in zip(r0["recv_splits"], caps))
        if not extra.get("random_routing"):
            assert r0["num_dropped"] > 0  # 9 tokens, E * ceil(0.75 * k * 9 / E) < 9 k slots


def test_base_eval_is_greedy_and_local(pair):
    pair.run(case_equivalence, name="base", E=4, k=1, dropless=True, mode="union", training=False)


def test_data_parallel_only_ep1_on_two_ranks(pair):
    """EP=1 on 2 ranks: every rank holds all experts, expert gradients are averaged over both."""
    for dropless, mode in ((True, "union"), (False, "per_rank")):
        r0, r1 = pair.run(case_equivalence, name="switch", E=4, k=1, dropless=dropless, mode=mode, ep=1)
        assert r0["first"] == r1["first"] == 0
        assert len(r0["send_splits"]) == len(r1["send_splits"]) == 1  # nothing crosses ranks


# ---------------------------------------------------------------------------------------------
# empty experts, empty ranks


def _skewed_router(E: int = 4) -> torch.Tensor:
    """Feature 0 is 1 for every token, feature 1 is +1 on rank 0 and -1 on rank 1: rank 0's
    tokens all pick expert 3, rank 1's expert 2 (both on rank 1); experts 0 and 1 get nothing."""
    w = torch.zeros(E, D)
    w[:, 2:] = 0.1 * torch.randn(E, D - 2, generator=torch.Generator().manual_seed(7))
    w[0, 0] = w[1, 0] = -4.0
    w[2, 0], w[2, 1] = 4.0, -4.0
    w[3, 0], w[3, 1] = 4.0, 4.0
    return w


def _skewed_tokens() -> list[torch.Tensor]:
    xs = _tokens(SIZES, 11)
    for r, x in enumerate(xs):
        x[:, :2] = 0.0
        x[:, 0] = 1.0
        x[:, 1] = 1.0 if r == 0 else -1.0
        x[:, 2:] *= 0.3
    return xs


@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "capacity"])
def test_empty_experts_and_a_rank_that_receives_nothing(pair, dropless):
    """Rank 0 sends all its tokens to rank 1 and receives none; rank 1 sends nothing to rank 0;
    experts 0 and 1 get no token at all (zero gradient, exactly)."""
    r0, r1 = pair.run(
        case_equivalence,
        name="switch",
        E=4,
        k=1,
        dropless=dropless,
        mode="union" if dropless else "per_rank",
        router_weight=_skewed_router().tolist(),
        tokens=[x.tolist() for x in _skewed_tokens()],
        extra={"capacity_factor": 4.0},
    )
    assert r0["counts_E"] == [0.0, 0.0, 0.0, float(SIZES[0])]
    assert r1["counts_E"] == [0.0, 0.0, float(SIZES[1]), 0.0]
    if dropless:
        assert r0["send_splits"] == [0, SIZES[0]] and r1["send_splits"] == [0, SIZES[1]]
        assert r0["received"] == 0  # zero rows on this rank
    assert r0["expert_grad_zero"] == [True, True]
    assert r1["expert_grad_zero"] == [False, False]


@pytest.mark.parametrize("name, dropless", [("switch", True), ("switch", False), ("gshard", True), ("base", True)])
def test_rank_with_no_tokens(pair, name, dropless):
    """Rank 1 holds no tokens at all (T = 0); it still takes part in every exchange."""
    k = 2 if name == "gshard" else 1
    extra = {"random_routing": False} if name == "gshard" else {}
    r0, r1 = pair.run(
        case_equivalence,
        name=name,
        E=4,
        k=k,
        dropless=dropless,
        mode="union" if dropless else "per_rank",
        sizes=(7, 0),
        extra=extra,
    )
    assert sum(r1["counts_E"]) == 0
    if name == "base":
        assert r0["counts_total"] == balanced_capacities(7, 4).float().tolist()


# ---------------------------------------------------------------------------------------------
# the process groups


def case_groups(rank, states):
    s1, s2 = states[1], states[2]
    # a bad size raises on every rank before any collective (no hang)
    try:
        ParallelState.build(ep_size=3)
    except ConfigError as e:
        msg = str(e)
    else:
        raise AssertionError("ep_size=3 on 2 ranks did not raise")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=s2.ep_group)  # the new groups work
    u = torch.tensor([rank + 1.0])
    dist.all_reduce(u, group=s1.expert_dp_group)
    return {
        "ep2": (
            s2.ep_ranks,
            s2.expert_dp_ranks,
            s2.dp_ranks,
            s2.ep_rank,
            s2.expert_dp_group is None,
            s2.expert_shard(4),
        ),
        "ep1": (s1.ep_ranks, s1.expert_dp_ranks, s1.dp_ranks, s1.ep_rank, s1.ep_group is None, s1.expert_shard(4)),
        "sums": (t.item(), u.item()),
        "msg": msg,
    }


def test_parallel_state_groups(pair):
    r0, r1 = pair.run(case_groups)
    assert r0["ep2"] == ((0, 1), (0,), (0, 1), 0, True, (0, 2))
    assert r1["ep2"] == ((0, 1), (1,), (0, 1), 1, True, (2, 2))
    assert r0["ep1"] == ((0,), (0, 1), (0, 1), 0, True, (0, 4))
    assert r1["ep1"] == ((1,), (0, 1), (0, 1), 0, True, (0, 4))
    assert r0["sums"] == r1["sums"] == (3.0, 3.0)
    assert "world size 2 is not divisible by ep_size*pp_size=3*1=3" in r0["msg"]


def case_expert_dp_sum(rank, states):
    s = states[2]
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=s.expert_dp_group)
    return s.ep_ranks, s.expert_dp_ranks, t.item()


@pytest.mark.slow
def test_four_ranks_expert_data_parallel_groups():
    """4 ranks, EP=2: two EP groups {0,1}, {2,3}; experts averaged within expert-data-parallel
    groups {0,2}, {1,3}; BASE balances within each EP group.  Also EP=4 and EP=1 (pure DP)."""
    quad = WorkerPair(4)
    try:
        out = quad.run(case_expert_dp_sum)
        assert out == [((0, 1), (0, 2), 2.0), ((0, 1), (1, 3), 4.0), ((2, 3), (0, 2), 2.0), ((2, 3), (1, 3), 4.0)]
        sizes = (9, 6, 5, 8)
        cases = [
            dict(name="switch", E=4, k=1, dropless=True, mode="union"),
            dict(name="switch", E=4, k=1, dropless=False, mode="per_rank"),
            dict(name="gshard", E=8, k=2, dropless=True, mode="union", extra={"random_routing": False}),
            dict(name="topk", E=4, k=2, dropless=False, mode="per_rank", ep=4),
            dict(name="switch", E=8, k=1, dropless=True, mode="union", ep=4),
            dict(name="switch", E=4, k=1, dropless=False, mode="per_rank", ep=1),
        ]
        for kw in cases:
            quad.run(case_equivalence, sizes=sizes, **kw)
        r = quad.run(case_equivalence, name="base", E=4, k=1, dropless=True, mode="union", sizes=sizes)
        per_group = balanced_capacities(15, 4) + balanced_capacities(13, 4)
        assert r[0]["counts_total"] == per_group.float().tolist()
    finally:
        quad.stop()


# ---------------------------------------------------------------------------------------------
# in-process: validation, layout, the one-process path, expert parameters


def test_validation_messages():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by ep_size\*pp_size=4\*1=4"):
        check_parallel_sizes(6, 4)
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by ep_size\*pp_size=2\*4=8"):
        check_parallel_sizes(4, 2, 4)
    with pytest.raises(ValueError, match=r"ep_size=0 must be >= 1"):
        check_parallel_sizes(4, 0)
    with pytest.raises(ValueError, match=r"pp_size=0 must be >= 1"):
        check_parallel_sizes(4, 1, 0)
    with pytest.raises(ValueError, match=r"moe.num_experts=6 is not divisible by ep_size=4"):
        check_expert_sharding(6, 4)
    with pytest.raises(ValueError, match=r"ep_size=0 must be >= 1"):
        check_expert_sharding(4, 0)
    for err in (lambda: check_parallel_sizes(6, 4), lambda: check_expert_sharding(6, 4)):
        with pytest.raises(ConfigError) as e:
            err()
        assert "\n" not in str(e.value)
    check_parallel_sizes(8, 2, 2)
    check_expert_sharding(8, 4)
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        MoELayer(D, FF, _cfg("switch", 4, 1, True), dispatcher=_FakeShard(3, 0))


class _FakeShard(AllToAllDispatcher):
    """Only the shard bookkeeping of a dispatcher at ep_size, without a process group."""

    def __init__(self, ep_size, ep_rank):
        self.group, self.ep_size, self.ep_rank = None, ep_size, ep_rank


def test_build_needs_init_process_group_and_single_state():
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ParallelState.build(ep_size=1)
    s = ParallelState.single()
    assert (s.rank, s.world_size, s.dp_size, s.ep_size, s.expert_dp_size, s.ep_rank, s.pp_size) == (0, 1, 1, 1, 1, 0, 1)
    assert s.ep_group is None and s.dp_group is None and s.expert_shard(8) == (0, 8) and s.is_main
    assert copy.deepcopy(s) is s


def test_rank_layout():
    groups = rank_groups(8, 2, 2)
    by_kind: dict[str, list] = {}
    for kind, ranks in groups:
        by_kind.setdefault(kind, []).append(ranks)
    assert by_kind["dp"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert by_kind["ep"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert by_kind["expert_dp"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert by_kind["pp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    for kind, gs in by_kind.items():  # every rank in exactly one group of each kind
        assert sorted(r for g in gs for r in g) == list(range(8)), kind
    assert rank_groups(2, 2) == [
        ("dp", (0, 1)),
        ("ep", (0, 1)),
        ("expert_dp", (0,)),
        ("expert_dp", (1,)),
        ("pp", (0,)),
        ("pp", (1,)),
    ]


@pytest.mark.parametrize(
    "name, k, dropless", [("switch", 1, True), ("gshard", 2, False), ("topk", 3, True), ("base", 1, True)]
)
def test_one_process_all_to_all_dispatcher_equals_local(name, k, dropless):
    """ep_size 1: the all-to-all dispatcher communicates nothing and equals the local one:
    bit-exact, except the expert weight gradients in capacity mode, which it computes on the
    kept rows grouped (the local dispatcher on the padded (E, C, D) batch): the same sums
    in another order, equal to 1e-6."""
    cfg = _cfg(name, 4, k, dropless, random_routing=False)
    torch.manual_seed(0)
    local = MoELayer(D, FF, cfg)
    torch.manual_seed(0)
    ep = MoELayer(D, FF, cfg, dispatcher=AllToAllDispatcher(ParallelState.single()))
    assert isinstance(local.dispatcher, LocalDispatcher)
    ep.load_state_dict(local.state_dict())
    x = _tokens((10,), 3)[0]
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, a1 = local(x1)
    y2, a2 = ep(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert a1.counts_E.tolist() == a2.counts_E.tolist()
    (y1 * x).sum().backward()
    (y2 * x).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    for (n, p1), p2 in zip(local.named_parameters(), ep.parameters()):
        tol = dict(rtol=1e-6, atol=1e-6) if not dropless and n.startswith("experts.") else dict(rtol=0, atol=0)
        torch.testing.assert_close(p1.grad, p2.grad, **tol, msg=n)
    assert copy.deepcopy(ep).dispatcher is ep.dispatcher  # a copied model shares the process groups


def test_shard_init_equals_slice_of_full_init():
    torch.manual_seed(3)
    full = GroupedExperts(6, D, FF)
    torch.manual_seed(3)
    shard = GroupedExperts(2, D, FF, first_expert=4, total_experts=6)
    assert torch.equal(shard.w1_EDF, full.w1_EDF[4:]) and torch.equal(shard.w2_EFD, full.w2_EFD[4:])
    with pytest.raises(ValueError, match="not a shard"):
        GroupedExperts(2, D, FF, first_expert=5, total_experts=6)


def test_expert_parameters_found_by_module_and_survive_deepcopy():
    model = TransformerLM(
        ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, vocab_size=50, seq_len=8, moe_every=1),
        MoEConfig(name="switch", num_experts=4),
    )
    names = [n for n, _ in expert_parameters(model)]
    assert names == [n for n, _ in model.named_parameters() if ".experts." in n] and len(names) == 4
    shared, experts = split_parameters(model)
    assert len(shared) + len(experts) == len(list(model.parameters())) and len(experts) == 4
    assert [n for n, _ in expert_parameters(copy.deepcopy(model))] == names  # marks on the module, not on parameters


def test_allreduce_gradients_single_process_is_a_no_op():
    layer = MoELayer(D, FF, _cfg("switch", 4, 1, True))
    layer(torch.randn(5, D))[0].sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    allreduce_gradients(layer, ParallelState.single())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, layer.parameters()))
