"""The ``hivemind`` expert layer: experts on other peers, found through the DHT (Learning@home).

It registers itself as ``moe.name=hivemind`` (:data:`HIVEMIND`, also declared in the package's
``moe.expert_layers`` entry points), with a runtime: :func:`connect` starts this process's DHT
peer from ``moe.swarm`` before the model is built, and every sparse block calls its experts
through it (``moe.model`` never sees the network).

Per token: one router per grid dimension scores that dimension's coordinates (product keys:
expert ``(i, j)`` scores ``s0[i] + s1[j]``) and the k best *declared* experts are chosen.
On grids of 2+ dimensions the layer reads which experts are declared (one batched DHT lookup
per dimension after the first, the records hivemind's beam search reads) and takes every
token's exact top k among them in one tensor op; hivemind's per-token beam search (a Python
loop per token, most of the layer's time over loopback, and approximate when experts are
missing) is the fallback for 1-D grids and for more token x expert pairs than
``EXACT_SEARCH_MAX_PAIRS``.

With ``require_signed`` (the default in configs) the experts are found through the signed
declarations alone (``moe.swarm.records``: one subkey per claimant, so no peer can shadow
another's), always by the exact search; a uid several keys claim is called at the server first
seen for it (trust on first use), or only at servers whose keys the run trusts
(``trusted_owners``).

Each chosen expert gets one batched request with all its rows; the layer waits until every
token has ``k_min`` replies (or all it asked for), then at most
``timeout_after_k_min`` more, and never longer than ``forward_timeout``.  An expert that
errs, times out, or replies with the wrong shape or dtype or with NaN/inf is a failed
expert: it is masked out of the token's softmax (weight exactly 0, no gradient, no backward
request) and its reply never reaches the model.  A reply (or an input gradient) whose largest
value is more than ``max_reply_scale`` times the largest value sent is refused too, and a peer
that sends any bad reply (wrong shape or dtype, NaN/inf, out of bounds) is dropped: named in a
warning, its experts not called again in this run (:class:`PeerBook`).  A token none of whose
experts replied gets zero from the layer and passes through the block's residual.

The call path is our own (hivemind's ``expert_forward`` / ``expert_backward`` RPCs and its
beam search), not ``RemoteMixtureOfExperts``: that one sends one request per (sample,
expert), only checks NaN/inf (not shape or dtype), raises when fewer than k_min reply, and
averages over whole samples rather than routing tokens.

Shape suffixes: T tokens, K choices (k_best), D model dim, G coordinates of one grid dim,
U distinct experts chosen in this forward.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from hivemind import DHT
from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.client.expert import expert_backward, expert_forward, get_server_stub
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import PeerID
from torch.autograd.function import once_differentiable

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model.layers import ExpertLayer, LayerAux, LayerContext, Router, register_expert_layer
from moe.swarm.dht import SwarmConnectError, shutdown_dht, start_dht
from moe.swarm.records import (
    RunShape,
    SignedDeclarer,
    fingerprint,
    get_signed_experts,
    record_validators,
    shape_mismatch,
)
from moe.swarm.uids import check_prefix, uid_coords

_SEARCH_BYTES = 12 * 1024  # grid scores per beam-search command (float32), well under 16 KiB pickled
# Exact search scores every (token, live expert) pair at once; beyond this many pairs the layer
# falls back to hivemind's per-token beam search (which scores a beam per token instead).
EXACT_SEARCH_MAX_PAIRS = 1 << 22


@dataclass
class SwarmAux(LayerAux):
    """``LayerAux`` plus what the swarm did in this forward.

    ``counts_E`` covers the whole grid, row-major (E = prod(grid_size)); ``num_routed`` is the
    assignments the tokens asked for (T x k_best) and ``num_dropped`` those no expert served:
    lost to failed experts, or never found (no live expert to choose).
    """

    expert_idx_TK: torch.Tensor = None  # long, flat grid index of each choice, -1 where beam search found fewer than K
    alive_TK: torch.Tensor = None  # bool, the choice's expert replied with a valid output
    failed: dict[str, str] = field(
        default_factory=dict
    )  # uid -> why, forward pass ("<beam search>" if the search failed)
    backward_failed: dict[str, str] = field(default_factory=dict)  # uid -> why, filled when backward runs
    num_unserved: int = 0  # tokens with no valid reply at all (layer output 0 for them)


def grid_balance_loss(
    scores: Sequence[torch.Tensor], expert_idx_TK: torch.Tensor, grid_size: Sequence[int]
) -> torch.Tensor:
    """Switch's load-balancing loss ``E * sum_e f_e * P_e`` over the whole product-key grid.

    ``scores[d]`` is ``(T, G_d)``, the router logits of grid dimension d.  A product-key
    softmax factorises, ``P(i, j) = softmax(s0)[i] * softmax(s1)[j]``, so ``P_e`` (the mean
    router probability of expert e) is exact and differentiable in every router; ``f_e`` is
    the fraction of assignments (chosen by beam search, ``expert_idx_TK >= 0``) sent to e and
    carries no gradient.  Only the chosen experts enter the sum, so the cost is O(T * U),
    not O(T * E).  1 when both are uniform, E when all tokens go to one expert with certainty.
    (hivemind's switch variant makes P independent of the router: zero gradient.)
    """
    T = scores[0].shape[0]
    chosen = expert_idx_TK[expert_idx_TK >= 0]
    if T == 0 or chosen.numel() == 0:
        return scores[0].sum() * 0.0
    E = math.prod(grid_size)
    uniq_U, counts_U = torch.unique(chosen, return_counts=True)
    f_U = counts_U.to(scores[0].dtype) / chosen.numel()
    P_TU = torch.ones(T, uniq_U.numel(), dtype=scores[0].dtype, device=scores[0].device)
    rest = uniq_U.clone()
    for d in reversed(range(len(grid_size))):  # row-major: the last dim varies fastest
        coord_U = rest % grid_size[d]
        rest = rest // grid_size[d]
        P_TU = P_TU * torch.softmax(scores[d], dim=-1).index_select(1, coord_U.to(scores[d].device))
    return E * torch.sum(f_U.to(P_TU.device) * P_TU.mean(0))


def grid_z_loss(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Router z-loss over the grid: the grid logsumexp is the sum of the dims' logsumexps."""
    lse_T = sum(torch.logsumexp(s, dim=-1) for s in scores)
    return lse_T.pow(2).mean() if lse_T.numel() else lse_T.sum()


class PeerBook:
    """What the layers of a model learn about the swarm's servers, shared by every block (they
    all call the same grid): the key each uid was first seen declared by (trust on first use:
    a later claimant of the uid is not called while the first one keeps declaring it), and the
    peers dropped for a bad reply (never called again in this run)."""

    def __init__(self) -> None:
        self.claimants: dict[str, str] = {}  # uid -> fingerprint of the key first seen declaring it
        self.dropped: dict[str, str] = {}  # server peer id (base58) -> why

    def choose(self, uid: str, claims: list[tuple[str, str]]) -> tuple[str, str]:
        """The (key fingerprint, server peer id) to call ``uid`` at, among acceptable ``claims``."""
        first = self.claimants.get(uid)
        for fp, peer in claims:
            if fp == first:
                return fp, peer
        fp, peer = min(claims)
        self.claimants[uid] = fp
        return fp, peer

    def drop(self, peer: str, uid: str, why: str) -> None:
        """Stop calling ``peer``: it sent a bad reply for ``uid``."""
        if peer in self.dropped:
            return
        self.dropped[peer] = f"{uid}: {why}"
        warnings.warn(
            f"moe=hivemind: dropped peer {peer}: it sent a bad reply for {uid} ({why}); "
            "none of its experts is called again in this run",
            stacklevel=2,
        )


@dataclass(frozen=True)
class _Found:
    """An expert to call: its uid and the server's peer id (what hivemind's ``ExpertInfo`` holds)."""

    uid: str
    peer_id: object


class SwarmMoE(nn.Module):
    """MoE layer over remote experts on a product-key grid (``moe=hivemind``).

    Args:
        d_model: D, the width of tokens and of the experts' inputs and outputs.
        dht: a running ``hivemind.DHT`` (``moe.swarm.server.start_dht``) this layer searches
            and calls experts through.
        uid_prefix: the grid's prefix: experts are ``<prefix>.<i>.<j>...``.
        grid_size: coordinates per grid dimension, e.g. [8, 8].
        k_best: experts per token (Learning@home: 4).
        k_min: replies a token waits for before the straggler timeout starts.
        forward_timeout: seconds a forward waits for replies at most.
        timeout_after_k_min: seconds to wait for stragglers once every token has k_min replies.
        backward_timeout: seconds a backward waits for expert gradients at most; an expert
            that does not answer in time passes no gradient back to the input.
        jitter_eps, init_scale, router_dtype: as ``moe.model.layers.Router`` (one per grid dim).
        require_signed: find and call experts through their signed declarations only
            (``moe.swarm.records``; servers with ``sign_records=True``), one subkey per claimant,
            so no peer can point another's uid at itself: hivemind's beam-search records are
            unsigned and single-valued.  The layer's DHT needs the run's ``record_validators``
            to check signatures on what it reads.
        trusted_owners: with ``require_signed``, call only servers whose declarations are
            signed by these keys (``moe.swarm.records.owner_key`` bytes, or their
            ``fingerprint`` strings); None: any signed declaration, the first seen per uid.
        max_reply_scale: a reply, or an input gradient, whose largest value is more than this
            many times the largest value sent (at least 1e-3) is refused and its server dropped.
        peers: the :class:`PeerBook` shared with the model's other blocks (default: its own).

    ``forward(x)`` maps ``(..., D) -> ((..., D), SwarmAux)``, like the other expert layers.
    """

    def __init__(
        self,
        d_model: int,
        *,
        dht: DHT,
        uid_prefix: str,
        grid_size: Sequence[int],
        k_best: int = 4,
        k_min: int = 1,
        forward_timeout: float = 30.0,
        timeout_after_k_min: float = 1.0,
        backward_timeout: float = 30.0,
        jitter_eps: float = 0.0,
        init_scale: float = 0.1,
        router_dtype: torch.dtype = torch.float32,
        require_signed: bool = False,
        trusted_owners: Sequence[bytes | str] | None = None,
        max_reply_scale: float = 1000.0,
        peers: PeerBook | None = None,
    ):
        super().__init__()
        if k_best < 1 or not 1 <= k_min <= k_best:
            raise ValueError(f"need k_best >= 1 and 1 <= k_min <= k_best, got k_best={k_best}, k_min={k_min}")
        if min(forward_timeout, backward_timeout, timeout_after_k_min) < 0:
            raise ValueError("timeouts must be >= 0 seconds")
        self.d_model = d_model
        self.prefix = check_prefix(uid_prefix)
        self.grid_size = [int(g) for g in grid_size]
        if not self.grid_size or min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be a non-empty list of positive ints, got {list(grid_size)}")
        self.num_experts = math.prod(self.grid_size)
        self.k_best, self.k_min = k_best, k_min
        self.forward_timeout, self.timeout_after_k_min, self.backward_timeout = (
            forward_timeout,
            timeout_after_k_min,
            backward_timeout,
        )
        self.dht = dht
        self.routers = nn.ModuleList(
            Router(d_model, g, jitter_eps=jitter_eps, init_scale=init_scale, dtype=router_dtype) for g in self.grid_size
        )
        self.beam_search = MoEBeamSearcher(dht, self.prefix + ".", self.grid_size)
        self.require_signed = require_signed
        self.trusted = (
            None
            if trusted_owners is None
            else frozenset(o if isinstance(o, str) else fingerprint(o) for o in trusted_owners)
        )
        if not max_reply_scale > 0:
            raise ValueError(f"max_reply_scale must be > 0, got {max_reply_scale}")
        self.max_reply_scale = max_reply_scale
        self.peers = peers if peers is not None else PeerBook()

    def _search(self, grid_scores, k: int):
        """Beam search on the DHT process; a future of, per token, up to k ``ExpertInfo``.

        hivemind's ``batch_find_best_experts(return_future=True)`` fails when awaited from
        another event loop ("MPFuture was created with no event loop") and builds a
        ``RemoteExpert`` per (token, choice); its coroutine run directly gives the bare infos.
        """
        bs = self.beam_search
        return self.dht.run_coroutine(
            partial(
                bs._batch_find_best_experts,
                prefix=bs.uid_prefix,
                batch_grid_scores=grid_scores,
                beam_size=k,
                negative_caching=bs.negative_caching,
                num_workers=bs.num_workers,
            ),
            return_future=True,
        )

    def live_experts(self, timeout: float) -> dict[int, object]:
        """Every expert declared under the grid right now: flat index -> ``ExpertInfo``.

        One batched DHT lookup per grid dimension after the first (hivemind stores, under each
        uid prefix ``<prefix>.<i>.``, the next coordinates that have a live expert), the same
        records the beam search reads; a grid of one dimension has no such index (empty)."""
        if len(self.grid_size) < 2:
            return {}
        deadline = time.monotonic() + timeout
        level = {f"{self.prefix}.{i}.": (i,) for i in range(self.grid_size[0])}
        live: dict[int, object] = {}
        for d in range(1, len(self.grid_size)):
            future = self.beam_search.get_active_successors(
                list(level), grid_size=self.grid_size[d], return_future=True
            )
            found = future.result(timeout=max(0.0, deadline - time.monotonic()))
            nxt = {}
            for prefix, successors in found.items():
                for coord, info in successors.items():
                    coords = level[prefix] + (int(coord),)
                    if d == len(self.grid_size) - 1:
                        if info.uid == ".".join(
                            [self.prefix, *map(str, coords)]
                        ):  # a record naming another uid: never call it
                            live[self.flat_index(coords)] = info
                    else:
                        nxt[f"{prefix}{coord}."] = coords
            level = nxt
        return live

    def _exact_search(self, scores: list[torch.Tensor], k: int, live: dict[int, object]) -> list[list]:
        """Per token, the k best live experts by product-key score (best first): exact where
        a beam search is approximate, and one tensor op for all tokens instead of a Python
        beam per token."""
        flat = torch.tensor(sorted(live), dtype=torch.long)
        coords, rest = [], flat.clone()
        for d in reversed(range(len(self.grid_size))):
            coords.insert(0, rest % self.grid_size[d])
            rest = rest // self.grid_size[d]
        cpu = [s.detach().float().cpu() for s in scores]
        T = cpu[0].shape[0]
        chunk = max(1, EXACT_SEARCH_MAX_PAIRS // len(flat))  # tokens scored at once: memory stays bounded
        infos = [live[int(f)] for f in flat]
        rows: list[list] = []
        for t0 in range(0, T, chunk):
            total = sum(s[t0 : t0 + chunk][:, c] for s, c in zip(cpu, coords))  # (tokens, live experts)
            top = total.topk(min(k, len(flat)), dim=1).indices
            rows += [[infos[j] for j in row] for row in top.tolist()]
        return rows

    def _in_grid(self, uid: str) -> tuple[int, ...] | None:
        """The grid coordinates of ``uid``, or None when it is not an expert of this grid."""
        try:
            coords = uid_coords(uid, self.prefix)
        except ValueError:
            return None
        if len(coords) != len(self.grid_size) or any(not 0 <= c < g for c, g in zip(coords, self.grid_size)):
            return None
        return coords

    def signed_experts(self) -> tuple[dict[int, _Found], dict[str, str]]:
        """The experts to call, from the signed declarations: flat index -> (uid, server), each
        uid at a trusted server (``trusted_owners``) or at the one first seen for it; and why
        declared experts cannot be called (uid -> why)."""
        claims = get_signed_experts(self.dht, self.prefix, timeout=self.forward_timeout)
        live: dict[int, _Found] = {}
        unusable: dict[str, str] = {}
        for uid, declared in claims.items():
            coords = self._in_grid(uid)
            if coords is None:
                continue  # a record outside our grid: never call it
            ok = [
                (fingerprint(owner), peer)
                for owner, peer in declared
                if self.trusted is None or fingerprint(owner) in self.trusted
            ]
            if not ok:
                unusable[uid] = "declared by keys that are not trusted (moe.swarm.trusted_keys)"
                continue
            _, peer = self.peers.choose(uid, ok)
            if peer in self.peers.dropped:
                unusable[uid] = f"its server {peer} was dropped ({self.peers.dropped[peer]})"
                continue
            live[self.flat_index(coords)] = _Found(uid, PeerID.from_base58(peer))
        return live, unusable

    def _nothing_signed(self) -> str:
        """Why the signed search found nothing to call (one more lookup, only then)."""
        try:
            unsigned = self.live_experts(self.forward_timeout) if len(self.grid_size) >= 2 else {}
        except Exception:
            unsigned = {}
        if unsigned:
            return f"no signed declaration of any expert of the grid ({len(unsigned)} declared unsigned)"
        return "no expert of the grid is declared on the DHT"

    def _unsigned_search(self, scores: list[torch.Tensor], T: int, K: int) -> tuple[list[list], dict[str, str]]:
        """``require_signed=False``: hivemind's unsigned records (any peer can point a uid at
        itself): the exact search over the declared experts on grids of 2+ dimensions, else (or
        past ``EXACT_SEARCH_MAX_PAIRS``) hivemind's beam search."""
        search_failed: dict[str, str] = {}
        live = None
        if len(self.grid_size) >= 2:
            try:
                live = self.live_experts(self.forward_timeout)
            except Exception:  # the index is unreadable: the beam search below tries the DHT itself
                live = None
            if live is not None and T * len(live) > EXACT_SEARCH_MAX_PAIRS:
                live = None
        if live is not None:
            if not live:
                search_failed["<beam search>"] = "no expert of the grid is declared on the DHT"
                return [[] for _ in range(T)], search_failed
            return self._exact_search(scores, K, live), search_failed
        np_scores = [s.detach().float().cpu().numpy() for s in scores]
        # one DHT command per chunk of tokens, each pickled under 16 KiB: multiprocessing
        # sends a bigger message in two writes, and hivemind's DHT process reads its
        # (non-blocking) command pipe so that the second part fails and the DHT dies
        step = max(1, _SEARCH_BYTES // (4 * sum(self.grid_size)))
        pendings = [self._search([a[t0 : t0 + step] for a in np_scores], K) for t0 in range(0, T, step)]
        deadline = time.monotonic() + self.forward_timeout
        try:
            found = [row for p in pendings for row in p.result(timeout=max(0.0, deadline - time.monotonic()))]
        except Exception as exc:  # DHT unreachable or too slow: every token unserved this step
            for p in pendings:
                p.cancel()
            found = [[] for _ in range(T)]
            search_failed["<beam search>"] = f"{type(exc).__name__}: {exc}"[:300]
        return found, search_failed

    def flat_index(self, coords: Sequence[int]) -> int:
        """Row-major grid index of expert coordinates."""
        idx = 0
        for c, g in zip(coords, self.grid_size):
            idx = idx * g + c
        return idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SwarmAux]:
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"SwarmMoE input has last dim {shape[-1]}, expected d_model={self.d_model}")
        x_TD = x.reshape(-1, shape[-1])
        T, K = x_TD.shape[0], self.k_best
        scores = [r(x_TD) for r in self.routers]  # (T, G_d) each, fp32 (or router_dtype)
        expert_idx_TK = torch.full((T, K), -1, dtype=torch.long)
        calls: dict[str, _ExpertCall] = {}
        search_failed: dict[str, str] = {}
        found: list[list] = [[] for _ in range(T)]
        if T and self.require_signed:
            try:
                live, search_failed = self.signed_experts()
            except Exception as exc:  # the records are unreadable: every token unserved this step
                live, search_failed = {}, {"<signed search>": f"{type(exc).__name__}: {exc}"[:300]}
            if live:
                found = self._exact_search(scores, K, live)
            elif not search_failed:
                search_failed["<signed search>"] = self._nothing_signed()
        elif T:
            found, search_failed = self._unsigned_search(scores, T, K)
        if T:  # the chosen experts, one call each
            for t, row in enumerate(found):
                for j, expert in enumerate(row[:K]):
                    call = calls.get(expert.uid)
                    if call is None:
                        coords = self._in_grid(expert.uid)
                        if coords is None:
                            continue  # a record outside our grid: never call it
                        peer = expert.peer_id.to_base58()
                        if peer in self.peers.dropped:
                            search_failed[expert.uid] = f"its server was dropped ({self.peers.dropped[peer]})"
                            continue
                        call = calls[expert.uid] = _ExpertCall(expert.uid, expert.peer_id, self.flat_index(coords))
                    call.rows.append(t)
                    call.slots.append(j)
                    expert_idx_TK[t, j] = call.flat
        p2p = (
            RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p()) if calls else None
        )  # cached per process by the DHT
        state = _CallState(
            list(calls.values()),
            self.d_model,
            T,
            K,
            self.k_min,
            self.forward_timeout,
            self.timeout_after_k_min,
            self.backward_timeout,
            p2p,
            self.max_reply_scale,
            self.peers,
        )
        state.failed.update(search_failed)
        # the empty leaf makes autograd run our backward (the experts' training step on their
        # servers) even when nothing before this layer needs a gradient
        y_TKD, alive_TK = _SwarmCall.apply(x_TD.float(), torch.empty(0, requires_grad=True), state)

        # gate: product-key scores of the chosen experts, failed ones masked out of the softmax
        chosen_TK = expert_idx_TK >= 0
        logits_TK = torch.zeros(T, K, dtype=scores[0].dtype, device=x.device)
        rest = expert_idx_TK.clamp_min(0).to(x.device)
        for d in reversed(range(len(self.grid_size))):
            logits_TK = logits_TK + scores[d].gather(1, rest % self.grid_size[d])
            rest = rest // self.grid_size[d]
        alive_TK = alive_TK.to(x.device)
        any_T1 = alive_TK.any(dim=1, keepdim=True)
        masked_TK = torch.where(any_T1, logits_TK.masked_fill(~alive_TK, float("-inf")), torch.zeros_like(logits_TK))
        weights_TK = torch.softmax(masked_TK, dim=1) * alive_TK  # 0 for failed and for unserved tokens
        out_TD = torch.einsum("tk,tkd->td", weights_TK.to(y_TKD.dtype), y_TKD).to(x.dtype)

        counts_E = torch.bincount(expert_idx_TK[chosen_TK], minlength=self.num_experts).float()
        aux = SwarmAux(
            aux_loss=grid_balance_loss(scores, expert_idx_TK, self.grid_size),
            z_loss=grid_z_loss(scores),
            counts_E=counts_E,
            num_dropped=float(T * K) - alive_TK.sum().float().cpu(),  # lost to failed experts, or never found
            num_routed=torch.tensor(float(T * K)),  # the assignments the tokens asked for
            expert_idx_TK=expert_idx_TK,
            alive_TK=alive_TK.detach().cpu(),
            failed=dict(state.failed),
            backward_failed=state.backward_failed,
            num_unserved=int((~any_T1).sum()),
        )
        return out_TD.view(shape), aux


@dataclass
class _ExpertCall:
    """One chosen expert and the (token, choice) pairs it serves in this forward."""

    uid: str
    peer_id: object
    flat: int
    rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    alive: bool = False


@dataclass
class _CallState:
    calls: list[_ExpertCall]
    d_model: int
    T: int
    K: int
    k_min: int
    forward_timeout: float
    timeout_after_k_min: float
    backward_timeout: float
    p2p: object  # hivemind P2P replica of the layer's DHT
    max_reply_scale: float
    peers: PeerBook
    failed: dict[str, str] = field(default_factory=dict)
    backward_failed: dict[str, str] = field(default_factory=dict)


def _check_reply(reply, rows: int, d_model: int, sent_max: float, max_scale: float) -> str | None:
    """Why a reply is unusable, or None: exactly one float32 (rows, D) tensor, all finite, its
    largest value at most ``max_scale`` times the largest value sent (at least 1e-3)."""
    if not isinstance(reply, (list, tuple)) or len(reply) != 1 or not isinstance(reply[0], torch.Tensor):
        n = len(reply) if isinstance(reply, (list, tuple)) else "?"
        return f"expected one tensor, got {type(reply).__name__} of {n}"
    t = reply[0]
    if tuple(t.shape) != (rows, d_model):
        return f"wrong shape {tuple(t.shape)}, expected {(rows, d_model)}"
    if t.dtype != torch.float32:
        return f"wrong dtype {t.dtype}, expected torch.float32"
    if not bool(torch.isfinite(t).all()):
        return "non-finite values (NaN/inf)"
    limit = max_scale * max(sent_max, 1e-3)
    biggest = float(t.abs().max()) if t.numel() else 0.0
    if biggest > limit:
        return f"values up to {biggest:.3g}, over {max_scale:g}x the largest value sent ({sent_max:.3g})"
    return None


def _gather_replies(
    tasks: dict[Future, int],
    calls: list[_ExpertCall],
    T: int,
    need_T: torch.Tensor,
    d_model: int,
    timeout: float,
    after_k_min: float,
    sent_max: list[float],
    state: _CallState,
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Wait for replies: until every token has ``need_T`` valid ones (then ``after_k_min`` more
    seconds for stragglers) or ``timeout`` seconds in all.  Returns valid replies and failure
    reasons by call index; calls still pending at the end are cancelled and count as failed.
    A reply that arrives but is bad (``_check_reply``) drops its server (``state.peers``)."""
    ok: dict[int, torch.Tensor] = {}
    bad: dict[int, str] = {}
    got_T = torch.zeros(T, dtype=torch.long)
    start = time.monotonic()
    deadline = start + timeout
    pending = set(tasks)
    satisfied = False
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
        for fut in done:
            i = tasks[fut]
            rows = len(calls[i].rows)
            if fut.cancelled():
                bad[i] = "cancelled"
                continue
            exc = fut.exception()
            if exc is not None:
                bad[i] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            reason = _check_reply(fut.result(), rows, d_model, sent_max[i], state.max_reply_scale)
            if reason is not None:
                bad[i] = reason
                state.peers.drop(calls[i].peer_id.to_base58(), calls[i].uid, reason)
                continue
            ok[i] = fut.result()[0]
            got_T[torch.tensor(calls[i].rows)] += 1
        if not satisfied and bool((got_T >= need_T).all()):
            satisfied = True
            deadline = min(deadline, time.monotonic() + after_k_min)
    for fut in pending:
        fut.cancel()
        bad[tasks[fut]] = f"no reply within {time.monotonic() - start:.1f} s"
    return ok, bad


class _SwarmCall(torch.autograd.Function):
    """Send each chosen expert its rows; ``(T, K, D)`` replies (0 where failed) and the alive mask."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, _always_grad: torch.Tensor, state: _CallState):
        ctx.device = x_TD.device
        x_TD = x_TD.detach().cpu().contiguous()
        T, K, D = state.T, state.K, state.d_model
        y_TKD = x_TD.new_zeros(T, K, D)
        alive_TK = torch.zeros(T, K, dtype=torch.bool)
        tasks: dict[Future, int] = {}
        for i, call in enumerate(state.calls):
            rows = x_TD[torch.tensor(call.rows)]
            msg = [serialize_torch_tensor(rows)]
            tasks[
                RemoteExpertWorker.run_coroutine(
                    expert_forward(call.uid, [rows], msg, get_server_stub(state.p2p, call.peer_id)), return_future=True
                )
            ] = i
        need_T = torch.zeros(T, dtype=torch.long)
        for call in state.calls:
            need_T[torch.tensor(call.rows)] += 1
        need_T = need_T.clamp_max(state.k_min)
        sent_max = [float(x_TD[torch.tensor(c.rows)].abs().max()) for c in state.calls]
        ok, bad = _gather_replies(
            tasks, state.calls, T, need_T, D, state.forward_timeout, state.timeout_after_k_min, sent_max, state
        )
        for i, out_ND in ok.items():
            call = state.calls[i]
            call.alive = True
            r, s = torch.tensor(call.rows), torch.tensor(call.slots)
            y_TKD[r, s] = out_ND
            alive_TK[r, s] = True
        for i, why in bad.items():
            state.failed[state.calls[i].uid] = why
        ctx.state = state
        ctx.save_for_backward(x_TD)
        y_TKD, alive_TK = y_TKD.to(ctx.device), alive_TK.to(ctx.device)
        ctx.mark_non_differentiable(alive_TK)
        return y_TKD, alive_TK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TKD: torch.Tensor, _grad_alive):
        state: _CallState = ctx.state
        (x_TD,) = ctx.saved_tensors
        grad_TKD = grad_TKD.detach().float().cpu().contiguous()
        grad_x = torch.zeros_like(x_TD)
        alive = [c for c in state.calls if c.alive]
        tasks: dict[Future, int] = {}
        for i, call in enumerate(alive):
            r, s = torch.tensor(call.rows), torch.tensor(call.slots)
            rows, g = x_TD[r], grad_TKD[r, s].contiguous()
            msg = [serialize_torch_tensor(rows), serialize_torch_tensor(g)]
            tasks[
                RemoteExpertWorker.run_coroutine(
                    expert_backward(call.uid, [rows, g], msg, get_server_stub(state.p2p, call.peer_id)),
                    return_future=True,
                )
            ] = i
        need_T = torch.zeros(state.T, dtype=torch.long)
        for call in alive:
            need_T[torch.tensor(call.rows)] += 1
        sent_max = [float(grad_TKD[torch.tensor(c.rows), torch.tensor(c.slots)].abs().max()) for c in alive]
        ok, bad = _gather_replies(
            tasks,
            alive,
            state.T,
            need_T,
            state.d_model,
            state.backward_timeout,
            state.backward_timeout,
            sent_max,
            state,
        )
        for i, g_ND in ok.items():
            grad_x.index_add_(0, torch.tensor(alive[i].rows), g_ND)
        for i, why in bad.items():
            state.backward_failed[alive[i].uid] = why
        grad_x = grad_x.to(ctx.device) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


# ---------------------------------------------------------------------------------------------
# moe.name=hivemind


class SwarmConnection:
    """This process's DHT peer, shared by every ``moe=hivemind`` block of a model (the layer
    registry's runtime: :func:`connect` starts it, ``close()`` leaves the swarm)."""

    def __init__(self, dht: DHT, declarer: SignedDeclarer | None = None):
        self.dht = dht
        self.declarer = declarer  # this member's signed statement of the run's shape, kept fresh
        self.peers = PeerBook()  # shared by the model's blocks

    def close(self) -> None:
        """Stop declaring the shape, stop the DHT peer (idempotent)."""
        declarer, self.declarer = self.declarer, None
        if declarer is not None:
            declarer.stop()
        dht, self.dht = self.dht, None
        if dht is not None:
            shutdown_dht(dht)


def run_shape(moe: MoEConfig, model: ModelConfig) -> RunShape:
    """What this run's experts must be: ``model.d_model`` rows, ``moe.expert_d_ff`` (or
    ``model.d_ff``) hidden units, ``moe.swarm.grid``."""
    return RunShape(model.d_model, moe.expert_d_ff or model.d_ff, tuple(moe.swarm.grid))


def connect(moe: MoEConfig, model: ModelConfig) -> SwarmConnection:
    """Join the swarm of ``moe.swarm.initial_peers`` (none: a new swarm), listening on
    ``moe.swarm.host_maddrs`` (loopback by default), NAT mapping and auto-NAT off, checking
    signed records with the run's validators (``moe.swarm.records``); check that this run's
    shape is the swarm's (:func:`run_shape`, against every member's signed statement, or the
    trusted ones'), then state it too, signed, for as long as the run lasts.  A peer that cannot
    be reached, or another shape, is a one-line ConfigError."""
    s = moe.swarm
    try:
        dht = start_dht(s.initial_peers, host_maddrs=s.host_maddrs, record_validators=record_validators(s.uid_prefix))
    except SwarmConnectError as e:
        raise ConfigError(f"moe.swarm.initial_peers: {e}") from None
    try:
        mine = run_shape(moe, model)
        why = shape_mismatch(dht, s.uid_prefix, mine, trusted=set(s.trusted_keys) or None, timeout=s.forward_timeout)
        if why is not None:
            raise ConfigError(f"moe.swarm: {why}; set model.d_model, moe.expert_d_ff and moe.swarm.grid to the run's")
        declarer = SignedDeclarer(dht, [], update_period=15.0, expiration=30.0, shape=mine, shape_prefix=s.uid_prefix)
    except BaseException:
        shutdown_dht(dht)
        raise
    return SwarmConnection(dht, declarer)


def build_swarm_layer(d_model: int, d_ff: int, moe: MoEConfig, *, activation: str, context: LayerContext) -> SwarmMoE:
    """A sparse block's ``SwarmMoE`` from ``moe`` (``moe.swarm.*``), calling experts through
    ``context.runtime`` (a :class:`SwarmConnection`).  ``d_ff`` and ``activation`` are the
    servers' (``moe-join --d-ff``, ``--activation``): nothing of them lives here."""
    if context.runtime is None:
        raise ValueError(
            "moe=hivemind needs a running DHT: build the model with "
            "context=LayerContext(runtime=moe.swarm.layer.connect(moe)) (the trainer does)"
        )
    s = moe.swarm
    return SwarmMoE(
        d_model,
        dht=context.runtime.dht,
        uid_prefix=s.uid_prefix,
        grid_size=s.grid,
        k_best=s.k_best,
        k_min=s.k_min,
        forward_timeout=s.forward_timeout,
        timeout_after_k_min=s.timeout_after_k_min,
        backward_timeout=s.backward_timeout,
        jitter_eps=moe.jitter_eps,
        init_scale=moe.init_scale,
        router_dtype=getattr(torch, moe.router_dtype),
        require_signed=s.require_signed,
        trusted_owners=s.trusted_keys or None,
        max_reply_scale=s.max_reply_scale,
        peers=context.runtime.peers,
    )


HIVEMIND = register_expert_layer("hivemind", ExpertLayer(build_swarm_layer, start_runtime=connect))
