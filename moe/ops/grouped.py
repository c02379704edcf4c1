"""Expert matmul kernels: one matmul per expert over rows grouped by expert, and a batched
matmul over a padded ``(E, C, D)`` buffer, both with hand-written backwards.

The layer code (``moe.model.experts``) calls :func:`grouped_mm` and :func:`batched_mm` and never
meets what is here: how the experts are spread over the CPU's cores, and how a weight
gradient is accumulated straight into an allocated ``.grad``.

Shape suffixes: N routed rows (sorted by expert), E experts, C capacity, D input dim, F output dim.
"""

from __future__ import annotations

import threading

import torch


def _expert_groups(counts: list[int], n_groups: int) -> list[list[tuple[int, int, int]]]:
    """Split experts into ``n_groups`` lists of (expert, first row, rows) with near-equal rows
    (longest-processing-time-first greedy)."""
    starts = [0]
    for n in counts[:-1]:
        starts.append(starts[-1] + n)
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for e in sorted(range(len(counts)), key=lambda e: -counts[e]):
        g = loads.index(min(loads))
        groups[g].append((e, starts[e], counts[e]))
        loads[g] += counts[e]
    return groups


def _for_each_expert(counts: list[int], body, device: torch.device) -> None:
    """Run ``body(e, start, n)`` for every expert.

    On a multi-core CPU the experts are spread over the intra-op threads, each running its
    matmuls single-threaded, the way ``bmm`` spreads a batch: a loop of small multi-threaded
    matmuls ran at half of dense speed at 64 experts here (fork/join per call), this runs at
    bmm's speed without bmm's padding.  Elsewhere (GPU, one thread, too few experts to share
    out evenly) a plain loop.
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    total = sum(counts)
    if threads > 1 and len(counts) >= 2 * threads and total:
        groups = _expert_groups(counts, threads)
        if max(sum(n for _, _, n in g) for g in groups) <= 1.15 * total / threads:
            errors: list[BaseException] = []

            def run(group):
                try:
                    with torch.no_grad():  # grad mode is per thread; these are raw kernels
                        for e, start, n in group:
                            body(e, start, n)
                except BaseException as exc:  # re-raised on the calling thread below
                    errors.append(exc)

            torch.set_num_threads(1)  # MKL/OpenMP: one thread per expert group
            try:
                workers = [threading.Thread(target=run, args=(g,), daemon=True) for g in groups[1:]]
                for w in workers:
                    w.start()
                run(groups[0])
                for w in workers:
                    w.join()
            finally:
                torch.set_num_threads(threads)
            if errors:
                raise errors[0]
            return
    start = 0
    for e, n in enumerate(counts):
        body(e, start, n)
        start += n


class _GroupedMM(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e]`` for every expert e.

    An explicit loop with ``out=`` slices in both passes: indexing ``w[e]`` inside autograd
    would make every expert's backward materialise a full (E, D, F) gradient (20x slower at
    E = 64), and ``unbind`` + ``cat`` copies every activation once more.

    With ``into_grad`` (opt-in: ``moe.model.experts.GroupedExperts.grad_into_buffers``, which the
    trainer turns on) and ``w`` a parameter whose ``.grad`` is already allocated (the trainer zeroes
    gradients in place), the weight gradient is accumulated straight into it and an
    expanded zero goes back through autograd, so gradient hooks still fire: a fresh
    (E, D, F) gradient is hundreds of MiB at large E, which the allocator maps and the
    kernel zeroes anew every step (220 ms per 512 MiB here).  Only for ``.backward()``:
    ``torch.autograd.grad`` would get the zero (hence opt-in).
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], into_grad: bool) -> torch.Tensor:
        out_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])

        def body(e, start, n):
            if n:
                torch.mm(x_ND[start : start + n], w_EDF[e], out=out_NF[start : start + n])

        _for_each_expert(counts, body, x_ND.device)
        ctx.save_for_backward(x_ND, w_EDF)
        ctx.counts = counts
        ctx.leaf = _leaf(w_EDF, into_grad)
        return out_NF

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor):
        x_ND, w_EDF = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = x_ND.new_empty(x_ND.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        accumulate = False
        if ctx.needs_input_grad[1]:
            held = _held_grad(ctx, w_EDF)
            accumulate = held is not None
            grad_w = held if accumulate else torch.empty_like(w_EDF)

        def body(e, start, n):
            g = grad_NF[start : start + n]
            if grad_x is not None and n:
                torch.mm(g, w_EDF[e].t(), out=grad_x[start : start + n])
            if grad_w is not None:
                if accumulate:
                    if n:
                        grad_w[e].addmm_(x_ND[start : start + n].t(), g)
                elif n:
                    torch.mm(x_ND[start : start + n].t(), g, out=grad_w[e])
                else:  # an expert that got no tokens is a normal case: zero gradient
                    grad_w[e].zero_()

        _for_each_expert(ctx.counts, body, x_ND.device)
        if accumulate:  # already in .grad; autograd adds zero (and runs the param's hooks)
            grad_w = w_EDF.new_zeros(()).expand(w_EDF.shape)
        return grad_x, grad_w, None, None


def _leaf(w: torch.Tensor, into_grad: bool) -> torch.Tensor | None:
    """The parameter whose ``.grad`` the backward may accumulate into, if allowed."""
    return w if (into_grad and w.is_leaf and w.requires_grad) else None


def _held_grad(ctx, w: torch.Tensor) -> torch.Tensor | None:
    """``w.grad`` when the weight gradient can be accumulated straight into it (see _GroupedMM)."""
    held = ctx.leaf.grad if ctx.leaf is not None else None
    if (
        held is not None
        and not torch.is_grad_enabled()
        and held.shape == w.shape
        and held.dtype == w.dtype
        and held.is_contiguous()
        and not held.requires_grad
    ):
        return held
    return None


class _BatchedMM(torch.autograd.Function):
    """``torch.bmm(x_ECD, w_EDF)`` with the weight gradient accumulated into ``w.grad`` when
    it is already allocated, as in _GroupedMM."""

    @staticmethod
    def forward(ctx, x_ECD: torch.Tensor, w_EDF: torch.Tensor, into_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x_ECD, w_EDF)
        ctx.leaf = _leaf(w_EDF, into_grad)
        return torch.bmm(x_ECD, w_EDF)

    @staticmethod
    def backward(ctx, grad_ECF: torch.Tensor):
        x_ECD, w_EDF = ctx.saved_tensors
        grad_x = torch.bmm(grad_ECF, w_EDF.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            held = _held_grad(ctx, w_EDF)
            if held is not None:
                held.baddbmm_(x_ECD.transpose(1, 2), grad_ECF)
                grad_w = w_EDF.new_zeros(()).expand(w_EDF.shape)
            else:
                grad_w = torch.bmm(x_ECD.transpose(1, 2), grad_ECF)
        return grad_x, grad_w, None


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], *, into_grad: bool = False) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]``; rows of ``x_ND`` are grouped by expert
    (``counts[e]`` rows for expert e, in order).  ``into_grad``: see :class:`_GroupedMM`."""
    assert sum(counts) == x_ND.shape[0] and len(counts) == w_EDF.shape[0]
    return _GroupedMM.apply(x_ND.contiguous(), w_EDF, counts, into_grad)


def batched_mm(x_ECD: torch.Tensor, w_EDF: torch.Tensor, *, into_grad: bool = False) -> torch.Tensor:
    """``torch.bmm(x_ECD, w_EDF)``, its weight gradient accumulated into ``w.grad`` with
    ``into_grad`` (see :class:`_GroupedMM`)."""
    return _BatchedMM.apply(x_ECD, w_EDF, into_grad)
