"""The swarm rooms: remote experts served with hivemind over 127.0.0.1, no mocks.

Real DHTs and expert servers on loopback (NAT mapping and auto-NAT off), torn down in
``finally`` blocks; every wait is bounded (server start, forward/backward timeouts, pytest
timeouts).  Network tests carry the ``network`` marker.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn

pytest.importorskip("hivemind")

from moe.model.experts import GroupedExperts  # noqa: E402
from moe.swarm.dht import shutdown_dht, start_dht  # noqa: E402
from moe.swarm.expert import SwarmExpert  # noqa: E402
from moe.swarm.layer import SwarmMoE, grid_balance_loss  # noqa: E402
from moe.swarm.server import ExpertServer, ServerProcess
from moe.swarm.uids import grid_uids, uid_coords

D, F_ = 16, 32
FAST = dict(forward_timeout=15.0, timeout_after_k_min=0.5, backward_timeout=15.0)
# for tests that assert "no live expert failed": on a loaded machine a live server may answer
# well after the first replies and must not be cut off as a straggler (a dead peer's call
# fails at once, its dial refused, so this costs nothing there)
PATIENT = dict(FAST, timeout_after_k_min=10.0)


class NaNExpert(nn.Module):
    """A broken peer: NaN in every reply."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w * float("nan")


class WrongShapeExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.cat([x, x[:, :1]], dim=1) * self.w


class WrongDtypeExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x * self.w).double()


class HugeExpert(nn.Module):
    """A hostile peer: finite replies, 1e30 times the input (issue 16); counts its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.w * 1e30


class _HugeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1e30


class HugeGradExpert(nn.Module):
    """A hostile peer: an honest forward, an input gradient 1e30 times the one it was sent."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _HugeGrad.apply(x) * self.w


class SlowExpert(nn.Module):
    """A straggler: answers correctly, but only after ``delay`` seconds."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        import time

        time.sleep(self.delay)
        return x * self.w


# ---------------------------------------------------------------- no network


def test_swarm_expert_is_one_grouped_expert():
    torch.manual_seed(0)
    g = GroupedExperts(3, D, F_, activation="silu")
    x = torch.randn(5, D)
    e = SwarmExpert.from_grouped(g, 2)
    assert e.activation == "silu"
    ref = g.forward_grouped(x, [0, 0, 5])
    torch.testing.assert_close(e(x), ref, rtol=1e-6, atol=1e-6)
    other = SwarmExpert(D, F_, activation="silu")
    other.copy_into(g, 0)
    torch.testing.assert_close(g.forward_grouped(x, [5, 0, 0]), other(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        SwarmExpert.from_grouped(g, 3)


def test_swarm_expert_init_matches_grouped_init_scale():
    torch.manual_seed(0)
    e = SwarmExpert(256, 512, init_scale=0.1)
    assert abs(e.w1_DF.std().item() - math.sqrt(0.1 / 256) * 0.88) < 0.002  # truncated at 2 std: std x 0.88
    assert e.w1_DF.abs().max() <= 2 * math.sqrt(0.1 / 256) + 1e-6


def test_grid_uids_and_coords():
    assert grid_uids("ffn", [2, 3])[:4] == ["ffn.0.0", "ffn.0.1", "ffn.0.2", "ffn.1.0"]
    assert uid_coords("ffn.1.2", "ffn.") == (1, 2)
    with pytest.raises(ValueError, match="prefix"):
        grid_uids("a.b", [2])


def test_grid_balance_loss_gradient_matches_finite_differences():
    """The aux loss depends on the routers (hivemind's switch variant does not): analytic
    gradient == central differences, in float64, with the choices held fixed."""
    torch.manual_seed(0)
    T, grid = 12, [3, 4]
    W = [torch.randn(g, D, dtype=torch.float64, requires_grad=True) for g in grid]
    x = torch.randn(T, D, dtype=torch.float64)
    idx = torch.randint(0, 12, (T, 2))
    idx[0, 1] = -1  # a token for which beam search found one expert only

    def loss(ws):
        return grid_balance_loss([x @ w.t() for w in ws], idx, grid)

    l0 = loss(W)
    grads = torch.autograd.grad(l0, W)
    assert all(g.abs().max() > 1e-4 for g in grads)
    eps = 1e-6
    for d in range(2):
        for i, j in [(0, 0), (1, 3), (2, 7)]:
            Wp = [w.detach().clone() for w in W]
            Wm = [w.detach().clone() for w in W]
            Wp[d][i, j] += eps
            Wm[d][i, j] -= eps
            fd = (loss(Wp) - loss(Wm)) / (2 * eps)
            assert abs(fd.item() - grads[d][i, j].item()) < 1e-7
    # uniform routers and uniform load: exactly 1, as Switch's loss
    flat = grid_balance_loss([torch.zeros(4, 3), torch.zeros(4, 4)], torch.arange(12).view(4, 3), grid)
    assert abs(flat.item() - 1.0) < 1e-6


# ---------------------------------------------------------------- network


def _local_moe(x_TD, W_ED, experts):
    """Reference: softmax over all experts of a 1-d grid, weighted sum of local experts."""
    w_TE = torch.softmax(x_TD @ W_ED.t(), dim=-1)
    return sum(w_TE[:, e : e + 1] * ex(x_TD) for e, ex in enumerate(experts))


@pytest.fixture(scope="module")
def inproc():
    """One expert server in this process (so its weight gradients are observable) with
    good and broken experts under several prefixes, and a client DHT."""
    torch.manual_seed(1)
    good = [SwarmExpert(D, F_) for _ in range(3)]
    experts = {
        "eq.0": SwarmExpert(D, F_),
        "eq.1": SwarmExpert(D, F_),
        "nan.0": NaNExpert(),
        "nan.1": good[0],
        "shape.0": WrongShapeExpert(),
        "shape.1": good[1],
        "dtype.0": WrongDtypeExpert(),
        "dtype.1": good[2],
        "slow.1": SwarmExpert(D, F_),  # its slow sibling slow.0 runs in a process of its own
        "huge.0": HugeExpert(),
        "huge.1": SwarmExpert(D, F_),
        "biggrad.0": HugeGradExpert(),
        "biggrad.1": SwarmExpert(D, F_),
    }
    local = {uid: m for uid, m in experts.items()}
    server = client = None
    try:
        server = ExpertServer({u: _clone(m) for u, m in experts.items()}, D, ready_timeout=60)
        client = start_dht(server.maddrs)
        yield server, client, local
    finally:
        if client is not None:
            shutdown_dht(client)
        if server is not None:
            server.shutdown()


def _clone(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


@pytest.mark.network
@pytest.mark.timeout(90)
def test_remote_equals_local_outputs_and_gradients(inproc):
    """Tolerance: 1e-5 absolute / 1e-4 relative (float32; the server runs the same rows in
    the same order, so the differences are at most reduction-order rounding)."""
    server, client, local = inproc
    torch.manual_seed(2)
    layer = SwarmMoE(D, dht=client, uid_prefix="eq", grid_size=[2], k_best=2, k_min=2, **FAST)
    x = torch.randn(10, D, requires_grad=True)
    y, aux = layer(x)
    assert not aux.failed and aux.alive_TK.all()
    (y * torch.linspace(-1, 1, D)).sum().backward()
    assert not aux.backward_failed

    x_ref = x.detach().clone().requires_grad_(True)
    W_ref = layer.routers[0].weight_ED.detach().clone().requires_grad_(True)
    ref_experts = [_clone(local["eq.0"]), _clone(local["eq.1"])]
    y_ref = _local_moe(x_ref, W_ref, ref_experts)
    (y_ref * torch.linspace(-1, 1, D)).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(layer.routers[0].weight_ED.grad, W_ref.grad, **tol)
    # the server accumulated its experts' weight gradients (no optimizer: nothing stepped)
    served = server.modules
    for uid, ref in zip(["eq.0", "eq.1"], ref_experts):
        torch.testing.assert_close(served[uid].w1_DF.grad, ref.w1_DF.grad, **tol)
        torch.testing.assert_close(served[uid].w2_FD.grad, ref.w2_FD.grad, **tol)
        torch.testing.assert_close(served[uid].w1_DF.detach(), local[uid].w1_DF.detach())


@pytest.mark.network
@pytest.mark.timeout(90)
@pytest.mark.parametrize("prefix, why", [("nan", "non-finite"), ("shape", "wrong shape"), ("dtype", "wrong dtype")])
def test_invalid_replies_count_as_failed_and_never_reach_the_output(inproc, prefix, why):
    server, client, local = inproc
    torch.manual_seed(3)
    # a long straggler window: under load the broken reply may land well after the good one,
    # and it must be judged on its content, not cut off as a straggler (the wait ends when both are in)
    layer = SwarmMoE(
        D, dht=client, uid_prefix=prefix, grid_size=[2], k_best=2, k_min=1, **dict(FAST, timeout_after_k_min=10.0)
    )
    x = torch.randn(8, D, requires_grad=True)
    y, aux = layer(x)
    assert set(aux.failed) == {f"{prefix}.0"} and why in aux.failed[f"{prefix}.0"], aux.failed
    assert torch.isfinite(y).all()
    assert not aux.alive_TK[aux.expert_idx_TK == 0].any() and aux.alive_TK[aux.expert_idx_TK == 1].all()
    assert aux.num_dropped.item() == 8 and aux.num_unserved == 0
    # the output is the good expert alone, with weight 1 (the broken one is out of the softmax)
    torch.testing.assert_close(y, local[f"{prefix}.1"](x.detach()), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.routers[0].weight_ED.grad).all()
    assert layer.routers[0].weight_ED.grad.abs().max() == 0  # one live expert: its weight is 1, constant
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, D + 1))


@pytest.mark.network
@pytest.mark.timeout(90)
def test_huge_finite_replies_are_refused_and_their_server_dropped_and_named(inproc):
    """Issue 16: an expert answering 1e30 (forward), or sending back a 1e30 input gradient, was
    accepted, and one volunteer stopped the run.  Now a reply over ``max_reply_scale`` times the
    largest value sent is refused, and its server is named and never called again."""
    server, client, local = inproc
    torch.manual_seed(4)
    peer = server.dht.peer_id.to_base58()
    kw = dict(dht=client, grid_size=[2], k_best=2, k_min=1, **dict(FAST, timeout_after_k_min=10.0))
    layer = SwarmMoE(D, uid_prefix="huge", **kw)
    x = torch.randn(8, D, requires_grad=True)
    with pytest.warns(UserWarning, match=f"dropped peer {peer}: it sent a bad reply for huge.0") as seen:
        y, aux = layer(x)
    assert len(seen) == 1 and "over 1000x the largest value sent" in str(seen[0].message)
    assert set(aux.failed) == {"huge.0"} and "values up to" in aux.failed["huge.0"], aux.failed
    torch.testing.assert_close(y, local["huge.1"](x.detach()), rtol=1e-4, atol=1e-5)  # the good expert alone
    calls = server.modules["huge.0"].calls
    y2, aux2 = layer(x)  # its server is dropped: neither of its experts is called again
    assert server.modules["huge.0"].calls == calls and aux2.num_unserved == 8
    assert all("was dropped" in why for why in aux2.failed.values()) and set(aux2.failed) == {"huge.0", "huge.1"}
    assert torch.equal(y2, torch.zeros_like(y2)) and layer.peers.dropped[peer].startswith("huge.0: values up to")

    grads = SwarmMoE(D, uid_prefix="biggrad", **kw)  # a fresh PeerBook
    x = torch.randn(8, D, requires_grad=True)
    y, aux = grads(x)
    assert not aux.failed
    with pytest.warns(UserWarning, match=f"dropped peer {peer}: it sent a bad reply for biggrad.0"):
        y.pow(2).sum().backward()
    assert set(aux.backward_failed) == {"biggrad.0"} and "over" in aux.backward_failed["biggrad.0"]
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e3  # the 1e30 gradient never reached the input


@pytest.mark.network
@pytest.mark.timeout(90)
def test_straggler_is_cut_off_after_k_min_replies(inproc):
    """Every token has its k_min=1 reply from the fast expert: the slow one gets
    ``timeout_after_k_min`` more seconds, then counts as failed; the forward does not wait
    for it."""
    server, client, local = inproc
    slow = None
    try:
        slow = ServerProcess({"slow.0": SlowExpert(delay=30.0)}, D, initial_peers=server.maddrs, start_timeout=60)
        layer = SwarmMoE(
            D,
            dht=client,
            uid_prefix="slow",
            grid_size=[2],
            k_best=2,
            k_min=1,
            forward_timeout=60.0,
            timeout_after_k_min=0.3,
        )
        x = torch.randn(6, D)
        t0 = time.monotonic()
        y, aux = layer(x)
        elapsed = time.monotonic() - t0
        assert set(aux.failed) == {"slow.0"} and "no reply" in aux.failed["slow.0"], aux.failed
        assert elapsed < 15.0, elapsed  # not the 30 s the straggler takes (slack for a loaded machine)
        with torch.no_grad():
            torch.testing.assert_close(y, local["slow.1"](x), rtol=1e-4, atol=1e-5)
    finally:
        if slow is not None:
            slow.kill()  # it is asleep in its 30 s forward: a clean stop would wait that out


def _shut_down(client, *servers):
    """The client's DHT first, then each server that started (None: it never did)."""
    if client is not None:
        shutdown_dht(client)
    for s in servers:
        if s is not None:
            s.shutdown()


@pytest.fixture(scope="module")
def two_servers():
    """2 server processes x 4 experts on a [2, 4] grid, experts trained server-side by Adam."""
    torch.manual_seed(4)
    uids = grid_uids("ffn", [2, 4])
    opt = lambda p: torch.optim.Adam(p, lr=3e-2)  # noqa: E731
    a = b = client = None
    try:
        a = ServerProcess({u: SwarmExpert(D, F_) for u in uids[:4]}, D, optimizer=opt, start_timeout=60)
        b = ServerProcess(
            {u: SwarmExpert(D, F_) for u in uids[4:]}, D, optimizer=opt, initial_peers=a.maddrs, start_timeout=60
        )
        client = start_dht(a.maddrs + b.maddrs)
        yield a, b, client
    finally:
        _shut_down(client, b, a)


@pytest.mark.network
@pytest.mark.timeout(120)
def test_layer_trains_over_two_servers(two_servers):
    """Routers train here, experts on their servers (Adam per expert, stepped on every
    backward request), even though the layer's input needs no gradient."""
    a, b, client = two_servers
    torch.manual_seed(5)
    layer = SwarmMoE(D, dht=client, uid_prefix="ffn", grid_size=[2, 4], k_best=4, **PATIENT)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    x = torch.randn(48, D)
    target = 0.5 * torch.tanh(x.flip(1))
    losses = []
    for _ in range(8):
        y, aux = layer(x)
        assert not aux.failed and aux.num_unserved == 0
        loss = (y - target).pow(2).mean() + 0.01 * aux.aux_loss
        opt.zero_grad()
        loss.backward()
        assert not aux.backward_failed
        opt.step()
        losses.append(loss.item())
    served = {uid for uid in grid_uids("ffn", [2, 4]) if aux.counts_E[layer.flat_index(uid_coords(uid, "ffn"))] > 0}
    assert len(served) >= 4  # beam search spreads tokens over both servers' experts
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.network
@pytest.mark.timeout(90)
def test_aux_loss_has_a_real_gradient_through_the_layer(two_servers):
    """Grad of the aux loss w.r.t. the routers is nonzero and matches central differences
    (float64 routers; the beam search choices are stable under the 1e-6 perturbation)."""
    _, _, client = two_servers
    torch.manual_seed(6)
    layer = SwarmMoE(D, dht=client, uid_prefix="ffn", grid_size=[2, 4], k_best=2, router_dtype=torch.float64, **FAST)
    x = torch.randn(16, D)
    _, aux = layer(x)
    grads = torch.autograd.grad(aux.aux_loss, [r.weight_ED for r in layer.routers])
    assert all(g.abs().max() > 1e-4 for g in grads)
    eps = 1e-6
    for d, (i, j) in [(0, (0, 0)), (1, (2, 5))]:
        w = layer.routers[d].weight_ED
        with torch.no_grad():
            w[i, j] += eps
            _, plus = layer(x)
            w[i, j] -= 2 * eps
            _, minus = layer(x)
            w[i, j] += eps
        assert torch.equal(plus.expert_idx_TK, aux.expert_idx_TK) and torch.equal(
            minus.expert_idx_TK, aux.expert_idx_TK
        )
        fd = (plus.aux_loss - minus.aux_loss).item() / (2 * eps)
        assert abs(fd - grads[d][i, j].item()) < 1e-6 * max(1.0, abs(fd))


@pytest.mark.network
@pytest.mark.timeout(120)
def test_killed_server_is_masked_out_and_reported():
    """SIGKILL one of two servers mid-use: the next forward and backward succeed, its experts
    (still declared on the DHT) are reported failed and masked out, the output stays finite."""
    torch.manual_seed(7)
    uids = grid_uids("kill", [2, 2])
    a = b = client = None
    try:
        a = ServerProcess({u: SwarmExpert(D, F_) for u in uids[:2]}, D, start_timeout=60)
        b = ServerProcess({u: SwarmExpert(D, F_) for u in uids[2:]}, D, initial_peers=a.maddrs, start_timeout=60)
        client = start_dht(a.maddrs + b.maddrs)
        layer = SwarmMoE(D, dht=client, uid_prefix="kill", grid_size=[2, 2], k_best=4, **PATIENT)
        x = torch.randn(32, D, requires_grad=True)
        y, aux = layer(x)
        y.sum().backward()
        assert not aux.failed and aux.alive_TK.all()

        b.kill()  # kill.1.0 and kill.1.1 vanish without a goodbye
        x.grad = None
        y, aux = layer(x)
        y.pow(2).mean().backward()
        assert set(aux.failed) == {"kill.1.0", "kill.1.1"}
        lost = aux.expert_idx_TK >= 2  # flat indices of row 1 of the grid
        assert lost.any() and not aux.alive_TK[lost].any() and aux.alive_TK[~lost & (aux.expert_idx_TK >= 0)].all()
        assert aux.num_dropped.item() == lost.sum().item() and aux.num_unserved == 0
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert not aux.backward_failed
    finally:
        _shut_down(client, b, a)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_signed_expert_record_cannot_be_overwritten_by_another_key():
    """Peer A declares ffn.0.0 signed with its key; peer B, another key, can neither
    overwrite A's record nor add an unsigned one; B's own signed claim sits beside A's."""
    from hivemind.utils.crypto import RSAPrivateKey

    from moe.swarm.dht import visible_maddrs
    from moe.swarm.records import declare_signed_experts, get_signed_experts, record_validators, records_key

    key_a, key_b = RSAPrivateKey(), RSAPrivateKey()
    val_a, val_b = record_validators("ffn", key_a), record_validators("ffn", key_b)
    a = b = c = None
    try:
        a = start_dht(record_validators=val_a)
        b = start_dht(visible_maddrs(a), record_validators=val_b)
        assert declare_signed_experts(a, "ffn", ["ffn.0.0"]) == {"ffn.0.0": True}
        owner_a = val_a[0].local_public_key
        peer_a = a.peer_id.to_base58()

        from hivemind.utils import get_dht_time

        later = get_dht_time() + 120  # a newer record would win, if it were accepted
        assert not b.store(
            records_key("ffn"), b.peer_id.to_base58(), later, subkey=b"ffn.0.0" + owner_a
        )  # forge A's entry
        assert not b.store(records_key("ffn"), b.peer_id.to_base58(), later, subkey=b"ffn.0.0")  # unsigned entry
        assert not b.store(
            records_key("ffn"), 123, later, subkey=b"ffn.0.0" + val_b[0].local_public_key
        )  # wrong value type
        assert declare_signed_experts(b, "ffn", ["ffn.0.0"]) == {"ffn.0.0": True}  # its own claim: allowed

        # a peer that skips validation locally: the honest peers refuse its forgery on store and on get
        c = start_dht(visible_maddrs(a))
        c.store(records_key("ffn"), c.peer_id.to_base58(), later, subkey=b"ffn.0.0" + owner_a)

        for reader in (a, b):
            claims = dict(get_signed_experts(reader, "ffn")["ffn.0.0"])
            assert claims[owner_a[len(b"[owner:") : -1]] == peer_a
            assert len(claims) == 2 and b.peer_id.to_base58() in claims.values()
    finally:
        for d in (c, b, a):
            if d is not None:
                shutdown_dht(d)


class ScaledIdentity(nn.Module):
    """An impostor: finite, right shape, wrong function."""

    def __init__(self, scale: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return x * self.w


@pytest.mark.network
@pytest.mark.timeout(120)
def test_no_peer_can_take_over_or_shadow_an_honest_servers_uid():
    """hivemind's expert records are unsigned and single-valued: a later server declaring sig.1
    takes it over (beam search then calls it).  Issue 16: with ``require_signed`` the layer finds
    experts through the signed declarations alone (one subkey per claimant: nobody shadows the
    honest server's), keeps calling the server it first saw for a uid when an impostor signs a
    claim of its own, calls only trusted keys when given them, and no peer can pin a record an
    hour ahead: every peer of the run refuses expirations past the cap."""
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from moe.config import MAX_RECORD_LIFETIME
    from moe.swarm.records import fingerprint, owner_key, record_validators

    torch.manual_seed(8)
    key_honest, key_impostor = RSAPrivateKey(), RSAPrivateKey()
    honest_experts = {"sig.0": SwarmExpert(D, F_), "sig.1": SwarmExpert(D, F_)}
    reference = {u: _clone(m) for u, m in honest_experts.items()}
    honest = impostor = client = None
    try:
        honest = ExpertServer(
            honest_experts, D, sign_records=True, record_validators=record_validators("sig", key_honest)
        )
        client = start_dht(honest.maddrs, record_validators=record_validators("sig", RSAPrivateKey()))
        x = torch.randn(6, D)
        kw = dict(dht=client, uid_prefix="sig", grid_size=[2], k_best=2, k_min=1, **PATIENT)
        with torch.no_grad():
            tofu = SwarmMoE(D, require_signed=True, **kw)
            y0, aux0 = tofu(x)  # sees the honest server first
            assert not aux0.failed, aux0.failed
            want = _local_moe(x, tofu.routers[0].weight_ED, [reference["sig.0"], reference["sig.1"]])
            torch.testing.assert_close(y0, want, rtol=1e-4, atol=1e-5)

            # the impostor declares sig.1 too: unsigned (hivemind's record) and signed with its own key
            impostor = ExpertServer(
                {"sig.1": ScaledIdentity(5.0)},
                D,
                initial_peers=honest.maddrs,
                sign_records=True,
                record_validators=record_validators("sig", key_impostor),
            )
            plain = SwarmMoE(D, **kw)
            plain.routers.load_state_dict(tofu.routers.state_dict())
            y_plain, aux_plain = plain(x)
            assert not aux_plain.failed  # unsigned records: sig.1 is answered by the impostor now
            hijacked = _local_moe(x, tofu.routers[0].weight_ED, [reference["sig.0"], ScaledIdentity(5.0)])
            torch.testing.assert_close(y_plain, hijacked, rtol=1e-4, atol=1e-5)

            y1, aux1 = tofu(x)  # signed declarations: the honest one still stands, and was seen first
            assert not aux1.failed, aux1.failed
            torch.testing.assert_close(y1, want, rtol=1e-4, atol=1e-5)
            assert tofu.peers.claimants["sig.1"] == fingerprint(owner_key(key_honest))

            trusted = SwarmMoE(D, require_signed=True, trusted_owners=[fingerprint(owner_key(key_honest))], **kw)
            trusted.routers.load_state_dict(tofu.routers.state_dict())
            y2, aux2 = trusted(x)
            assert not aux2.failed
            torch.testing.assert_close(y2, want, rtol=1e-4, atol=1e-5)

            theirs = SwarmMoE(D, require_signed=True, trusted_owners=[owner_key(key_impostor)], **kw)
            _, aux3 = theirs(x)
            assert set(aux3.failed) == {"sig.0"} and "not trusted" in aux3.failed["sig.0"], aux3.failed

            stranger = SwarmMoE(D, require_signed=True, trusted_owners=[owner_key(RSAPrivateKey())], **kw)
            y_none, aux_none = stranger(x)
            assert set(aux_none.failed) == {"sig.0", "sig.1"} and aux_none.num_unserved == 6
            assert torch.equal(y_none, torch.zeros_like(y_none))

        # an hour ahead: every honest peer refuses it, whoever writes it
        assert impostor.dht.store("sig.1", "pinned", get_dht_time() + 3600) is False
        assert client.store("sig.1", "pinned", get_dht_time() + 3600) is False
        assert client.store("sig.probe", "fine", get_dht_time() + MAX_RECORD_LIFETIME / 2) is True
    finally:
        if client is not None:
            shutdown_dht(client)
        for s in (impostor, honest):
            if s is not None:
                s.shutdown()


def _make_mp_temp_dir() -> None:
    import multiprocessing.util
    import os

    multiprocessing.util.get_temp_dir()  # what a connection handler does on its first pickle of a pipe
    os._exit(0)


def test_prepare_to_fork_leaves_no_held_lock_for_a_fork_to_inherit():
    """The hang of hivemind's server start, made deterministic: a process forked while another
    thread holds ``tempfile``'s module lock (as hivemind's DHT-handler thread did, creating the
    temp dir on its first pickle of a pipe) blocks forever when it needs the temp dir; after
    ``prepare_to_fork`` it never takes that lock, so the same fork completes."""
    import multiprocessing as mp
    import multiprocessing.process
    import tempfile

    from moe.swarm.dht import prepare_to_fork

    config = multiprocessing.process.current_process()._config
    saved = tempfile.tempdir, config.get("tempdir")
    ctx = mp.get_context("fork")

    def fork_while_lock_held():
        with tempfile._once_lock:  # "another thread" is inside tempfile's first-time set-up
            child = ctx.Process(target=_make_mp_temp_dir)
            child.start()
        child.join(5.0)
        code = child.exitcode
        if code is None:
            child.kill()
            child.join(5.0)
        return code

    try:
        tempfile.tempdir = None  # a fresh process: no temp dir yet
        config.pop("tempdir", None)
        assert fork_while_lock_held() is None  # the bug: the child hangs on the inherited lock
        prepare_to_fork()
        assert tempfile.tempdir is not None and config.get("tempdir")
        assert fork_while_lock_held() == 0  # the fix: nothing left to take the lock for
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is not None:
            config["tempdir"] = saved[1]


def _start_server(experts: dict, tries: int = 3, start_timeout: float = 60.0, **kwargs) -> ServerProcess:
    """A ``ServerProcess``, started up to ``tries`` times (``start_timeout`` s each).  The known
    cause of hangs at start is fixed (``prepare_to_fork``); the retry stays, bounded, for any
    other stall of a start on a loaded machine."""
    for attempt in range(1, tries + 1):
        try:
            return ServerProcess(experts, D, start_timeout=start_timeout, **kwargs)
        except TimeoutError:
            if attempt == tries:
                raise


def _weights(modules) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for m in modules for p in m.parameters()])


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_survives_a_sigkilled_server_and_uses_it_again_after_a_restart():
    """4 server processes (one grid row of 2 experts each, trained server-side by Adam); the
    layer trains; one server is SIGKILLed between two steps; training goes on with no
    exception, the loss keeps falling, the lost experts are masked and reported (also as the
    trainer's ``failed_experts`` metric); then a new server process serves the same uids and
    the layer uses them again: chosen, answering, no longer failed, and stepped by the
    gradients the layer sends them.

    The restarted server starts from the killed one's *last* weights: the experts live in
    shared memory (``share_memory()`` before the fork), so this process can read what the
    killed server had when it died, as a peer restarting from a checkpoint taken at its last
    step would.  (The experts' initial weights would do for the "used again" checks too; the
    last ones keep the loss curve continuous, so "the loss keeps falling" holds across the
    restart.)  Short declarations (re-declared every 2 s, expiring after 6 s) bound how long
    the client's DHT cache keeps pointing at the dead peer."""
    from moe.training.telemetry import LoadAccumulator

    torch.manual_seed(9)
    grid = [4, 2]
    uids = grid_uids("rs", grid)
    rows = [uids[2 * i : 2 * i + 2] for i in range(4)]  # server i serves rs.i.0 and rs.i.1
    experts = [{u: SwarmExpert(D, F_).share_memory() for u in row} for row in rows]
    opt = lambda p: torch.optim.Adam(p, lr=3e-2)  # noqa: E731
    net = dict(optimizer=opt, update_period=2.0, expiration=6.0)
    servers: list = [None] * 4
    restarted = client = None
    try:
        servers[0] = _start_server(experts[0], **net)
        for i in range(1, 4):
            servers[i] = _start_server(experts[i], initial_peers=servers[0].maddrs, **net)
        client = start_dht(servers[0].maddrs)
        layer = SwarmMoE(D, dht=client, uid_prefix="rs", grid_size=grid, k_best=4, k_min=1, **PATIENT)
        router_opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
        x = torch.randn(64, D)
        target = 0.5 * torch.tanh(x.flip(1))
        flat = {u: layer.flat_index(uid_coords(u, "rs")) for u in uids}
        killed = rows[3]

        def step():
            y, aux = layer(x)  # any exception here fails the test
            loss = (y - target).pow(2).mean() + 0.01 * aux.aux_loss
            router_opt.zero_grad()
            loss.backward()
            router_opt.step()
            assert torch.isfinite(y).all() and math.isfinite(loss.item())
            return loss.item(), aux

        def used(aux, uid) -> bool:
            """uid chosen by some token and answered every time it was chosen."""
            mask = aux.expert_idx_TK == flat[uid]
            return (
                bool(mask.any() and aux.alive_TK[mask].all())
                and uid not in aux.failed
                and uid not in aux.backward_failed
            )

        # 1. all 4 servers up
        w_start = _weights(experts[3].values())
        before = []
        for _ in range(6):
            loss, aux = step()
            assert not aux.failed and not aux.backward_failed and aux.num_unserved == 0, (
                aux.failed,
                aux.backward_failed,
            )
            before.append(loss)
        assert before[-1] < before[0], before
        assert not torch.equal(_weights(experts[3].values()), w_start)  # the server trains them, in shared memory

        # 2. SIGKILL the server of row 3 (2 of the 8 experts): no goodbye, its records stay on the DHT
        servers[3].kill()
        assert not servers[3].process.is_alive()
        last = {u: _clone(m) for u, m in experts[3].items()}  # its weights when it died
        metrics = LoadAccumulator()
        after = []
        for _ in range(8):
            loss, aux = step()
            assert set(aux.failed) | set(aux.backward_failed) <= set(killed), (aux.failed, aux.backward_failed)
            lost = torch.zeros_like(aux.alive_TK)
            for u in killed:
                lost |= aux.expert_idx_TK == flat[u]
            assert not aux.alive_TK[lost].any()  # masked: weight 0, no reply used
            assert aux.alive_TK[~lost & (aux.expert_idx_TK >= 0)].all()  # every other expert answered
            assert aux.num_dropped.item() == lost.sum().item()
            metrics.add(0, aux.counts_E, aux.num_dropped, aux.num_routed)
            metrics.add_failed(
                0, (u for u in (*aux.failed, *aux.backward_failed) if not u.startswith("<"))
            )  # as the trainer does
            after.append(loss)
        assert metrics.summary()["moe/layer_0/failed_experts"] == 2.0  # both lost experts, reported
        assert metrics.summary()["moe/layer_0/dropped_frac"] > 0
        assert after[-1] < after[0] and after[-1] < before[0], (before, after)

        # 3. a new server process for the same uids, from the killed one's last weights
        revived = {u: _clone(m).share_memory() for u, m in last.items()}
        w_revived = _weights(revived.values())
        restarted = _start_server(revived, initial_peers=servers[0].maddrs, **net)
        deadline, back, waited = time.monotonic() + 90.0, None, []
        for _ in range(60):  # until the layer's DHT lookups find the new server (cached records expire in <= 6 s)
            loss, aux = step()
            waited.append(loss)
            if all(used(aux, u) for u in killed):
                back = aux
                break
            assert time.monotonic() < deadline, f"restarted experts not used within 90 s: failed {aux.failed}"
            time.sleep(0.5)
        assert back is not None, "restarted experts not used within 60 steps"
        metrics = LoadAccumulator()
        again, seen = [], set()
        for _ in range(6):
            loss, aux = step()
            assert not aux.failed and not aux.backward_failed and aux.num_unserved == 0, (
                aux.failed,
                aux.backward_failed,
            )
            metrics.add_failed(0, aux.failed)
            seen.update(u for u in killed if used(aux, u))
            again.append(loss)
        assert seen, "the restarted experts were not chosen again"
        assert metrics.summary()["moe/layer_0/failed_experts"] == 0.0
        # the restarted experts received gradients and their server stepped them
        assert not torch.equal(_weights(revived.values()), w_revived)
        assert again[-1] < after[0], (before, after, waited, again)
    finally:
        _shut_down(client, restarted, *reversed(servers))


@pytest.mark.network
@pytest.mark.timeout(120)
def test_exact_search_over_live_experts_matches_the_beam_search_and_brute_force():
    """The layer lists the grid's live experts (one DHT lookup per dimension after the first)
    and takes each token's k best by product-key score in one tensor op.  On a full 2D grid
    that is exactly what hivemind's beam search returns; with experts missing it is the brute
    force top-k over the live ones (numpy), which a beam search only approximates."""
    torch.manual_seed(5)
    full = grid_uids("ex", [3, 4])
    missing = {"ex.0.1", "ex.2.3", "ex.1.0"}
    server = client = None
    try:
        server = ExpertServer({u: SwarmExpert(D, F_) for u in full}, D, ready_timeout=60)
        client = start_dht(server.maddrs)
        layer = SwarmMoE(D, dht=client, uid_prefix="ex", grid_size=[3, 4], k_best=3, **FAST)
        live = {}
        for _ in range(40):  # the declarations reach the DHT within a few seconds
            live = layer.live_experts(10.0)
            if len(live) == 12:
                break
            time.sleep(0.25)
        assert {info.uid for info in live.values()} == set(full) and sorted(live) == list(range(12))
        x = torch.randn(20, D)
        scores = [r(x) for r in layer.routers]
        exact = layer._exact_search(scores, 3, live)
        beam = layer._search([s.detach().numpy() for s in scores], 3).result(timeout=30)
        assert [[e.uid for e in row] for row in exact] == [[e.uid for e in row] for row in beam]
        # some experts gone: the brute-force top-3 over the rest
        some = {f: info for f, info in live.items() if info.uid not in missing}
        got = layer._exact_search(scores, 3, some)
        s0, s1 = (s.detach().numpy() for s in scores)
        for t, row in enumerate(got):
            cand = sorted(((s0[t, f // 4] + s1[t, f % 4], f) for f in some), reverse=True)[:3]
            assert [e.uid for e in row] == [f"ex.{f // 4}.{f % 4}" for _, f in cand]
            assert not {e.uid for e in row} & missing
    finally:
        if client is not None:
            shutdown_dht(client)
        if server is not None:
            server.shutdown()


@pytest.mark.network
@pytest.mark.timeout(180)
def test_a_layer_whose_experts_all_fail_says_so_on_the_console_in_the_summary_and_the_dashboard(
    tmp_path, tiny_data, capsys
):
    """Issue 16: with every server unsigned, training ran at `dropped 100.0%` and said nothing."""
    import dataclasses

    from moe.config import SwarmConfig
    from moe.dash.data import collapses, read_run
    from moe.training.loop import Trainer
    from moe.training.report import format_summary
    from tests.conftest import tiny_config

    server = ExpertServer({u: SwarmExpert(D, F_) for u in grid_uids("dead", [2, 2])}, D, ready_timeout=60)  # unsigned
    try:
        c = tiny_config(tmp_path, steps=6)
        swarm = SwarmConfig(
            grid=[2, 2],
            k_best=2,
            uid_prefix="dead",
            initial_peers=server.maddrs,
            forward_timeout=15,
            backward_timeout=15,
            timeout_after_k_min=0.5,
        )
        moe = dataclasses.replace(
            c.moe, name="hivemind", num_experts=4, top_k=2, dropless=True, jitter_eps=0.0, swarm=swarm
        )
        cfg = dataclasses.replace(
            c,
            model=dataclasses.replace(c.model, d_model=D, n_heads=2, d_ff=F_),
            moe=moe,
            logger=dataclasses.replace(c.logger, log_every=2),
        )
        with Trainer(cfg, data=tiny_data) as trainer:
            result = trainer.fit()
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "WARNING: block 0 served no token at step 2: every assignment was dropped (100.0%)" in err
    assert "no signed declaration" in err and "restart them without --unsigned" in err
    assert err.count("WARNING: block 0 served no token") == 1  # loud once, not every log window
    summary = format_summary(result)
    assert "WARNING: block 0 served no token" in summary and "require_signed=false" in summary
    flags = collapses(read_run(tmp_path))
    assert {f["layer"] for f in flags} == {0, 1} and all("every token dropped" in f["reason"] for f in flags)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_dht_process_reads_commands_longer_than_one_pipe_write():
    """hivemind's DHT process reads its command pipe non-blocking (uvloop's add_reader): a
    command over 16 KiB, written as its length and then its body, was read half-way, and the
    process died with its caller blocked.  ``start_dht``'s peer reads whole messages."""
    from hivemind.utils import get_dht_time

    dht = start_dht()
    try:
        value = "v" * 200_000
        for i in range(20):  # plain hivemind.DHT died within the first few, every run
            assert dht.store(f"k{i}", value, get_dht_time() + 60, return_future=True).result(10)
        assert dht.get("k19", latest=True, return_future=True).result(10).value == value
        assert dht.is_alive()
    finally:
        shutdown_dht(dht)
