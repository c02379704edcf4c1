"""Expert-load statistics: how evenly a router spreads its assignments over the experts.

Pure functions and a small accumulator; no ``torch.distributed`` and no I/O, so everything
here runs in a unit test.  In a multi-rank run the caller all-reduces the counts first.

Conventions for degenerate inputs (chosen so that nothing is ever NaN):

* **No tokens at all** (every count is 0): all counts are equal, so the layer is reported as
  perfectly balanced: ``cv = 0``, ``max_over_mean = 1``, ``frac = [1/E] * E``,
  ``entropy = ln E``, ``entropy_norm = 1``.
* **routed = 0**: ``dropped_frac = 0`` (nothing was routed, so nothing was dropped).
* **E = 1**: ``entropy = 0`` and ``ln E = 0``; ``entropy_norm`` is defined as 1 because a
  single expert is trivially balanced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Number = float | int | torch.Tensor


def _to_float(x: Number) -> float:
    return float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)


def load_stats(counts_E: torch.Tensor, dropped: Number, routed: Number) -> dict[str, float | list[float]]:
    """Balance statistics of one layer's per-expert assignment counts.

    ``counts_E``: shape ``(E,)``, assignments (tokens x choices) sent to each expert *before*
    capacity dropping.  ``dropped``: assignments dropped for lack of capacity.  ``routed``:
    total assignments routed (normally ``counts_E.sum()``).

    Returns ``cv`` (population std / mean), ``entropy`` (nats) and ``entropy_norm``
    (entropy / ln E, 1.0 when perfectly balanced), ``max_over_mean``, ``dropped_frac``,
    ``min_frac``, ``max_frac`` and ``frac`` (per-expert fractions summing to 1, a list).
    See the module docstring for the all-zero and single-expert conventions.
    """
    counts = torch.as_tensor(counts_E).detach().to("cpu", torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts_E must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("counts_E must be non-negative")
    E = counts.numel()
    total = float(counts.sum())
    routed_f = _to_float(routed)
    dropped_frac = _to_float(dropped) / routed_f if routed_f > 0 else 0.0

    if total <= 0:  # no tokens: all counts equal, report as perfectly balanced
        frac = [1.0 / E] * E
        return {
            "cv": 0.0,
            "entropy": math.log(E),
            "entropy_norm": 1.0,
            "max_over_mean": 1.0,
            "dropped_frac": dropped_frac,
            "min_frac": 1.0 / E,
            "max_frac": 1.0 / E,
            "frac": frac,
        }

    mean = total / E
    std = float(counts.std(correction=0))  # population std, as in the Switch/GShard balance plots
    p = counts / total
    # 0 * ln 0 = 0: only nonzero fractions contribute
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    entropy = max(entropy, 0.0)  # rounding can give -0.0 / -1e-17 for a one-hot load
    ln_e = math.log(E)
    return {
        "cv": std / mean,
        "entropy": entropy,
        "entropy_norm": entropy / ln_e if E > 1 else 1.0,
        "max_over_mean": float(counts.max()) / mean,
        "dropped_frac": dropped_frac,
        "min_frac": float(p.min()),
        "max_frac": float(p.max()),
        "frac": p.tolist(),
    }


@dataclass
class _LayerSums:
    """Running sums for one layer; tensors stay on their device until ``summary``."""

    counts: torch.Tensor
    dropped: Number = 0.0
    routed: Number = 0.0
    aux: Number = 0.0
    z: Number = 0.0
    n: int = 0


def _acc(total: Number, x: Number) -> Number:
    # Adding a detached tensor keeps the sum on the tensor's device: no host sync per add.
    if isinstance(x, torch.Tensor):
        return total + x.detach().to(torch.float64)
    return total + float(x)


class LoadAccumulator:
    """Sums per-layer router statistics over several steps, reduced once in :meth:`summary`.

    ``add`` never reads a tensor back to the host, so calling it every step costs no device
    synchronisation; ``summary`` and ``layer_fracs`` move the sums to the CPU.  In a multi-rank run,
    :meth:`merge_ranks` makes the sums global before ``summary``.
    """

    def __init__(self) -> None:
        self._layers: dict[int, _LayerSums] = {}
        self._failed: dict[
            int, dict[str, str]
        ] = {}  # layer -> remote expert (or search) -> why it failed, in the window
        self._bias: dict[int, torch.Tensor] = {}  # layer -> the expert bias (loss-free balancing)

    def add_layer_aux(self, layer: int, aux) -> None:
        """Add one training forward of MoE block ``layer`` from its ``LayerAux``: the load and
        losses, the expert bias (loss-free balancing) and the failed remote experts
        (``moe=hivemind``: uid -> why, forward and backward) when it has them."""
        self.add(layer, aux.counts_E, aux.num_dropped, aux.num_routed, aux.aux_loss.detach(), aux.z_loss.detach())
        if aux.expert_bias is not None:
            self.set_bias(layer, aux.expert_bias)
        failed = getattr(aux, "failed", None)
        if failed is not None:
            self.add_failed(layer, {**failed, **aux.backward_failed})

    def set_bias(self, layer: int, bias_E: torch.Tensor) -> None:
        """Loss-free balancing's expert bias of layer ``layer`` as the window's latest step used
        it (the same on every rank: kept, not summed).  The summary reports
        ``moe/layer_{i}/bias_e{j}`` and the spread ``bias_range``."""
        self._bias[layer] = bias_E.detach()

    def add_failed(self, layer: int, failures) -> None:
        """Remote experts (``moe=hivemind``) that failed in one step of layer ``layer``: uids, or
        a mapping uid -> why.  Names in ``<...>`` (``<beam search>``) are what failed before any
        expert was called: they give a reason, not an expert.  The summary reports
        ``moe/layer_{i}/failed_experts``, the distinct experts over the window."""
        reasons = failures if isinstance(failures, dict) else dict.fromkeys(failures, "")
        self._failed.setdefault(layer, {}).update(reasons)

    def failure(self, layer: int) -> str:
        """The most common reason the window's failures of ``layer`` gave, with an example
        (``""`` when none failed)."""
        failed = self._failed.get(layer) or {}
        reasons = [why for why in failed.values() if why]
        if not reasons:
            return ""
        why = max(set(reasons), key=reasons.count)
        who = next(uid for uid, w in failed.items() if w == why)
        n = sum(1 for uid in failed if not uid.startswith("<"))
        return f"{n} expert(s) failed; e.g. {who}: {why}" if not who.startswith("<") else f"{who}: {why}"

    def add(
        self,
        layer: int,
        counts_E: torch.Tensor,
        dropped: Number,
        routed: Number,
        aux_loss: Number = 0.0,
        z_loss: Number = 0.0,
    ) -> None:
        """Add one step of layer ``layer``: counts before dropping, dropped and routed
        assignments, and that step's auxiliary and z losses (averaged over adds, as given)."""
        counts = counts_E.detach().to(torch.float64)  # float64: exact integer sums up to 2**53
        if counts.ndim != 1:
            raise ValueError(f"counts_E must be 1-D, got shape {tuple(counts.shape)}")
        s = self._layers.get(layer)
        if s is None:
            self._layers[layer] = s = _LayerSums(counts=torch.zeros_like(counts))
        elif s.counts.shape != counts.shape:
            raise ValueError(f"layer {layer}: {counts.numel()} experts, earlier adds had {s.counts.numel()}")
        s.counts = s.counts + counts
        s.dropped = _acc(s.dropped, dropped)
        s.routed = _acc(s.routed, routed)
        s.aux = _acc(s.aux, aux_loss)
        s.z = _acc(s.z, z_loss)
        s.n += 1

    def summary(self) -> dict[str, float]:
        """Flat metrics ``moe/layer_{i}/{cv,entropy,entropy_norm,max_over_mean,dropped_frac,
        aux_loss,z_loss,frac_e{j}}``; losses are means over the adds, the rest use summed counts.
        With loss-free balancing also ``bias_e{j}`` and ``bias_range``."""
        out: dict[str, float] = {}
        for i in sorted(self._layers):
            s = self._layers[i]
            st = load_stats(s.counts, s.dropped, s.routed)
            p = f"moe/layer_{i}/"
            for k in ("cv", "entropy", "entropy_norm", "max_over_mean", "dropped_frac"):
                out[p + k] = st[k]
            out[p + "aux_loss"] = _to_float(s.aux) / s.n
            out[p + "z_loss"] = _to_float(s.z) / s.n
            for j, f in enumerate(st["frac"]):
                out[p + f"frac_e{j}"] = f
        for i in sorted(self._bias):
            bias = self._bias[i].to(torch.float64).cpu().tolist()
            for j, b in enumerate(bias):
                out[f"moe/layer_{i}/bias_e{j}"] = b
            out[f"moe/layer_{i}/bias_range"] = max(bias) - min(bias)
        for i in sorted(self._failed):
            out[f"moe/layer_{i}/failed_experts"] = float(sum(1 for uid in self._failed[i] if not uid.startswith("<")))
        return out

    def layer_fracs(self) -> dict[int, list[float]]:
        """Per-layer expert load fractions (each list sums to 1), e.g. for a layer x expert heatmap."""
        return {i: load_stats(s.counts, s.dropped, s.routed)["frac"] for i, s in sorted(self._layers.items())}

    @staticmethod
    def fracs_from_summary(metrics: dict[str, float]) -> dict[int, list[float]]:
        """The per-layer ``frac_e{j}`` values of a :meth:`summary` (e.g. a logged record) back as
        ``{layer: [frac_e0, frac_e1, ...]}``, layers and experts in order; other keys are ignored."""
        out: dict[int, dict[int, float]] = {}
        for k, v in metrics.items():
            if not k.startswith("moe/layer_"):
                continue
            layer, _, name = k[len("moe/layer_") :].partition("/")
            if layer.isdigit() and name.startswith("frac_e") and name[len("frac_e") :].isdigit():
                out.setdefault(int(layer), {})[int(name[len("frac_e") :])] = float(v)
        return {i: [fr[j] for j in sorted(fr)] for i, fr in sorted(out.items())}

    def merge_ranks(self, all_reduce_sum: Callable[[torch.Tensor], Any], n_ranks: int) -> None:
        """Turn this rank's sums into those of ``n_ranks`` ranks: counts, dropped and routed
        summed over the ranks, aux and z losses averaged.  ``all_reduce_sum`` sums one float64
        tensor in place across the ranks (a collective: every rank calls this with the same
        layers, which ranks running the same model have)."""
        if n_ranks == 1 or not self._layers:
            return
        layers = sorted(self._layers)
        first = self._layers[layers[0]].counts
        parts = []
        for i in layers:
            s = self._layers[i]
            scalars = [
                torch.as_tensor(v, dtype=torch.float64, device=first.device).reshape(1)
                for v in (s.dropped, s.routed, s.aux, s.z)
            ]
            parts += [s.counts.to(first.device), *scalars]
        flat = torch.cat(parts)
        all_reduce_sum(flat)
        offset = 0
        for i in layers:
            s = self._layers[i]
            E = s.counts.numel()
            s.counts = flat[offset : offset + E].to(s.counts.device)
            dropped, routed, aux, z = flat[offset + E : offset + E + 4].unbind()
            s.dropped, s.routed, s.aux, s.z = dropped, routed, aux / n_ranks, z / n_ranks
            offset += E + 4

    def reset(self) -> None:
        self._layers.clear()
        self._failed.clear()
        self._bias.clear()

    def __len__(self) -> int:
        """Number of layers seen since the last reset."""
        return len(self._layers)
