"""Expert matmul kernels: one matmul per expert over rows grouped by expert, and a batched
matmul over a padded ``(E, C, D)`` buffer, both with hand-written backwards; and torch's own
grouped GEMM (``torch._grouped_mm``, what torchtitan runs its experts on) behind the same
interface, with what GPUs require of it (:func:`torch_grouped_mm`).

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


# ---------------------------------------------------------------------------------------------
# torch's grouped GEMM

GEMMS = ("auto", "loop", "grouped_mm")  # moe.gemm
# Rows per expert group torch._grouped_mm needs for 16-bit inputs on CUDA (torchtitan pads each
# expert's tokens to this: TOKEN_GROUP_ALIGN_SIZE_M); nothing is needed on CPU or in fp32.
GROUPED_MM_ALIGN = 8


def has_torch_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def resolve_gemm(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``moe.gemm`` as run on ``device`` for experts computing in ``dtype``: ``auto`` is
    ``grouped_mm`` on CUDA in bf16/fp16 (one kernel for every expert, what its CUDA kernels are
    built for) and ``loop`` otherwise: on CPU our experts-over-threads loop measured faster side
    by side (``moe-bench layer``, docs/performance.md)."""
    if name not in GEMMS:
        raise ValueError(f"moe.gemm={name!r}; use one of {', '.join(GEMMS)}")
    if name == "auto":
        half = dtype in (torch.bfloat16, torch.float16)
        name = "grouped_mm" if device.type == "cuda" and half and has_torch_grouped_mm() else "loop"
    if name == "grouped_mm" and not has_torch_grouped_mm():
        raise ValueError(f"moe.gemm=grouped_mm: torch {torch.__version__} has no torch._grouped_mm; use moe.gemm=loop")
    return name


def _contiguous_grad(g: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward refuses a gradient with zero strides (an expanded one, e.g.
    # from .sum()): "Invalid strides/sizes"
    return g.contiguous()


def _raw_grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    offs = torch.tensor(counts, device=x_ND.device, dtype=torch.int64).cumsum(0).to(torch.int32)  # int32 ends
    y = torch._grouped_mm(x_ND, w_EDF, offs=offs)
    if y.requires_grad:
        y.register_hook(_contiguous_grad)
    return y


def torch_grouped_mm(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], *, align_rows: int | None = None
) -> torch.Tensor:
    """:func:`grouped_mm` computed by ``torch._grouped_mm`` (autograd included).

    ``align_rows``: every expert's group padded with zero rows to a multiple of it (and to at
    least one multiple: no empty groups), the padding dropped from the output; None: what the
    device needs (:data:`GROUPED_MM_ALIGN` for 16-bit inputs on CUDA, else 1: nothing to pad).
    Offsets are int32 ends of the groups, as the op requires."""
    assert sum(counts) == x_ND.shape[0] and len(counts) == w_EDF.shape[0]
    if align_rows is None:
        align_rows = GROUPED_MM_ALIGN if x_ND.is_cuda and x_ND.element_size() == 2 else 1
    x_ND = x_ND.contiguous()
    if x_ND.shape[0] == 0:  # nothing routed here: our loop gives the empty output and zero gradients
        return grouped_mm(x_ND, w_EDF, counts)
    if align_rows <= 1:
        return _raw_grouped_mm(x_ND, w_EDF, counts)
    padded = [max(align_rows, -(-c // align_rows) * align_rows) for c in counts]
    dev, E, N = x_ND.device, len(counts), x_ND.shape[0]
    counts_t = torch.tensor(counts, device=dev)
    starts = counts_t.cumsum(0) - counts_t
    padded_t = torch.tensor(padded, device=dev)
    padded_starts = padded_t.cumsum(0) - padded_t
    expert_N = torch.repeat_interleave(torch.arange(E, device=dev), counts_t, output_size=N)
    dest_N = padded_starts[expert_N] + torch.arange(N, device=dev) - starts[expert_N]
    x_pad = x_ND.new_zeros(sum(padded), x_ND.shape[1]).index_copy(0, dest_N, x_ND)
    return _raw_grouped_mm(x_pad, w_EDF, padded).index_select(0, dest_N)
