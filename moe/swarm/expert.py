"""The expert FFN a swarm peer serves: one expert of ``GroupedExperts`` as its own module.

A remote expert and a local one compute the same function ``w2·act(w1·x)`` with the same
initialisation, so weights can move between them (``from_grouped`` / ``copy_into``) and the
equivalence remote == local is testable.  No dropout: hivemind's ``ModuleBackend`` re-runs
the forward inside backward, so a random mask would differ between the two passes.

Shape suffixes: N rows, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe.model.experts import ACTIVATIONS, GroupedExperts, activation_fn, small_init_


class SwarmExpert(nn.Module):
    """One two-layer FFN expert ``act(x @ w1_DF) @ w2_FD``, the math of one ``GroupedExperts`` expert.

    Args:
        d_model: D.
        d_ff: F, the expert's hidden size.
        activation: gelu | relu | silu.
        init_scale: Switch small-scale init, truncated normal with std sqrt(s / fan_in), the
            same draw ``GroupedExperts`` makes for each of its experts.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "gelu", init_scale: float = 0.1):
        super().__init__()
        self.d_model, self.d_ff = d_model, d_ff
        self.activation = activation
        self.act = activation_fn(activation)
        self.w1_DF = nn.Parameter(torch.empty(d_model, d_ff))
        self.w2_FD = nn.Parameter(torch.empty(d_ff, d_model))
        small_init_(self.w1_DF, init_scale, d_model)
        small_init_(self.w2_FD, init_scale, d_ff)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if x_ND.shape[-1] != self.d_model:
            raise ValueError(f"expert input has last dim {x_ND.shape[-1]}, expected d_model={self.d_model}")
        x_ND = x_ND.to(self.w1_DF.dtype)
        return self.act(x_ND @ self.w1_DF) @ self.w2_FD

    @classmethod
    def from_grouped(cls, experts: GroupedExperts, index: int) -> SwarmExpert:
        """A copy of expert ``index`` (local index into ``experts``' stacks), same activation."""
        if not 0 <= index < experts.num_experts:
            raise ValueError(f"expert index {index} is out of range for {experts.num_experts} experts")
        if experts.gated:
            raise ValueError("swarm experts are two-matrix FFNs; gated (swiglu) experts cannot be served")
        out = cls(experts.d_model, experts.d_ff, activation=_activation_name(experts.act))
        out.load_from_grouped(experts, index)
        return out

    @torch.no_grad()
    def load_from_grouped(self, experts: GroupedExperts, index: int) -> None:
        """Overwrite this expert's weights with expert ``index`` of ``experts``."""
        self._check_shapes(experts)
        self.w1_DF.copy_(experts.w1_EDF[index])
        self.w2_FD.copy_(experts.w2_EFD[index])

    @torch.no_grad()
    def copy_into(self, experts: GroupedExperts, index: int) -> None:
        """Write this expert's weights into slot ``index`` of ``experts``."""
        self._check_shapes(experts)
        experts.w1_EDF[index].copy_(self.w1_DF)
        experts.w2_EFD[index].copy_(self.w2_FD)

    def _check_shapes(self, experts: GroupedExperts) -> None:
        if experts.gated:
            raise ValueError(
                "swarm experts are two-matrix FFNs (gelu, relu, silu); these experts are gated (swiglu) "
                "and their third matrix w3 has no place here"
            )
        if (experts.d_model, experts.d_ff) != (self.d_model, self.d_ff):
            raise ValueError(
                f"GroupedExperts has (d_model, d_ff)=({experts.d_model}, {experts.d_ff}), this expert "
                f"({self.d_model}, {self.d_ff})"
            )


def _activation_name(fn) -> str:
    for name, f in ACTIVATIONS.items():
        if f is fn:
            return name
    raise ValueError(f"unknown activation function {fn!r}")
