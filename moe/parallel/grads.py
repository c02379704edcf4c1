"""Gradient reduction for expert + data parallelism: experts stay out of the data-parallel
all-reduce and are reduced within their expert-data-parallel group instead.

Which parameters are experts' is read from the modules, not from marks on the parameters: a
module whose class sets ``expert_parallel = True`` (:class:`moe.model.experts.GroupedExperts`)
holds expert weights, sharded over the expert-parallel group.  (DeepSpeed marks each
parameter ``allreduce = False``; attributes on a parameter are lost by ``copy.deepcopy``, which
would silently put the experts back into the data-parallel all-reduce.  A DeepSpeed backend
sets its marks from :func:`expert_parameters`.)

Scaling: each rank's loss is the mean over its own tokens and the training loss is the mean
over the ``dp_size`` ranks.  A non-expert gradient is summed over the data-parallel group and
divided by ``dp_size``.  An expert's gradient already holds, through the all-to-all
backward, the contributions of every rank of its EP group; summed over its expert-data-parallel
group it holds those of all ``dp_size`` ranks, so it too is divided by ``dp_size`` (not by the
expert-data-parallel size), and the result does not depend on ``ep_size``.  DeepSpeed's
engine scales expert gradients the same way.

Clipping (:func:`clip_grad_norm_`) takes the norm of the whole model's gradient: shared
parameters once, every expert once, whatever the expert-parallel size.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.model.experts import split_parameters
from moe.parallel.state import ParallelState


def _sum_and_scale(params: list[nn.Parameter], group, group_size: int, divide_by: int) -> None:
    """Sum the gradients over ``group`` (one flat all-reduce per dtype and device) and divide.

    A trainable parameter without a gradient takes part with zeros, so every rank issues the
    same collectives in the same order whatever its graph touched."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        if group_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.div_(divide_by)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        elif divide_by != 1:
            torch._foreach_div_(grads, divide_by)


@torch.no_grad()
def allreduce_gradients(model: nn.Module, state: ParallelState, *, shared: bool = True) -> None:
    """Average gradients after ``backward``: shared parameters over the data-parallel group,
    expert parameters within their expert-data-parallel group (both divided by ``dp_size``,
    see the module docstring).  Every rank of a stage must call it, after every backward
    that should be averaged.

    ``shared=False`` reduces the experts only, for a backend whose engine (DDP, DeepSpeed)
    already all-reduces the shared parameters and has been told to leave the experts out
    (:func:`expert_parameters` names them).
    """
    if state.dp_size == 1:
        return
    shared_params, expert_params = split_parameters(model)
    if shared:
        _sum_and_scale(shared_params, state.dp_group, state.dp_size, state.dp_size)
    _sum_and_scale(expert_params, state.expert_dp_group, state.expert_dp_size, state.dp_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, state: ParallelState) -> torch.Tensor:
    """Clip every gradient by the L2 norm of the *whole model's* gradient; returns that norm.

    Call after :func:`allreduce_gradients`: shared gradients are then the same on every rank,
    and so are the expert gradients within an expert-data-parallel group.  What still differs
    is which experts a rank holds: the expert-parallel group holds each expert exactly once.
    So the norm is ``sqrt(|shared|^2 + sum over the EP group of |local experts|^2)``, one
    all-reduce of one number over the EP group, the same on every rank, and every rank
    scales by the same factor (torch's ``max_norm / (norm + 1e-6)``, capped at 1).  Without
    expert parallelism this is ``torch.nn.utils.clip_grad_norm_`` itself (bit-identical to a
    one-process run).  ``max_norm=inf`` only measures.
    """
    if state.ep_size == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    shared, experts = split_parameters(model)
    shared_g = [p.grad for p in shared if p.grad is not None]
    expert_g = [p.grad for p in experts if p.grad is not None]
    dev = state.device
    zero = torch.zeros((), device=dev)
    shared_n = torch.nn.utils.get_total_norm(shared_g).to(dev) if shared_g else zero
    expert_sq = torch.nn.utils.get_total_norm(expert_g).to(dev).square() if expert_g else zero.clone()
    dist.all_reduce(expert_sq, group=state.ep_group)  # every expert once: the EP group holds each exactly once
    total = (shared_n.square() + expert_sq).sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
    return total


class _Bucket:
    __slots__ = ("params", "pending", "flat", "work")

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.pending = len(params)
        self.flat: torch.Tensor | None = None
        self.work = None


def _weak_hook(method):
    """A parameter hook that calls ``method`` while its object lives, without keeping it alive.

    Python's collector does not see a tensor's hooks, so a hook holding the reducer, which
    holds the parameter, is a cycle it never frees: the reducer's process groups (and their
    gloo threads) would outlive the run, into the interpreter's exit."""
    ref = weakref.WeakMethod(method)

    def hook(p: nn.Parameter) -> None:
        bound = ref()
        if bound is not None:
            bound(p)

    return hook


class OverlappedGradReducer:
    """:func:`allreduce_gradients`, overlapped with the backward of the step's last micro-batch.

    The parameters are cut into buckets of about ``bucket_mb`` MiB, in reverse registration
    order (roughly the order the backward produces their gradients), shared and expert
    parameters apart (their groups differ).  A ``post_accumulate_grad`` hook on each parameter
    counts down its bucket; when a bucket is complete, it and every complete bucket after it
    are all-reduced asynchronously, *in bucket order*, so every rank issues the same
    collectives in the same order whatever order its backward finished them in (DDP's rule).
    :meth:`finish` launches what is left (parameters that got no gradient take part with
    zeros, as in :func:`allreduce_gradients`), waits and divides by ``dp_size``.  The
    gradients are views into their bucket's flat buffer (bound before the backward), so
    nothing is copied into a bucket or back.
    The result is that of :func:`allreduce_gradients`; only the time it is exposed changes.

    Usage per step: ``arm()`` before the last micro-batch's backward, ``finish()`` after it
    (earlier micro-batches only accumulate).  Gloo and NCCL run the collectives on their own
    threads/streams, so the buckets travel while the backward goes on.
    """

    def __init__(self, model: nn.Module, state: ParallelState, bucket_mb: float = 8.0):
        self.state = state
        shared, experts = split_parameters(model)
        self.kinds = []  # (group, group size, buckets in launch order)
        limit = max(1, int(bucket_mb * 2**20))
        for params, group, size in (
            (shared, state.dp_group, state.dp_size),
            (experts, state.expert_dp_group, state.expert_dp_size),
        ):
            buckets: list[_Bucket] = []
            cur: list[nn.Parameter] = []
            nbytes = 0
            for p in reversed([p for p in params if p.requires_grad]):
                if cur and (
                    nbytes + p.numel() * p.element_size() > limit
                    or p.dtype != cur[0].dtype
                    or p.device != cur[0].device
                ):
                    buckets.append(_Bucket(cur))
                    cur, nbytes = [], 0
                cur.append(p)
                nbytes += p.numel() * p.element_size()
            if cur:
                buckets.append(_Bucket(cur))
            self.kinds.append([group, size, buckets, 0])  # 0: the next bucket to launch
        self._where: dict[int, tuple[int, int]] = {}
        self._handles = []
        for k, (_, size, buckets, _) in enumerate(self.kinds):
            for b, bucket in enumerate(buckets):
                for p in bucket.params:
                    self._where[id(p)] = (k, b)
                    if size > 1:
                        self._handles.append(p.register_post_accumulate_grad_hook(_weak_hook(self._ready)))
        self.armed = False
        self.launched_in_backward = 0  # buckets on their way before finish() (telemetry, tests)

    def arm(self) -> None:
        """The next backward is the step's last: launch buckets as they complete."""
        self.armed = True
        self.launched_in_backward = 0
        for kind in self.kinds:
            kind[3] = 0
            for bucket in kind[2]:
                bucket.pending, bucket.work = len(bucket.params), None
                if kind[1] > 1:
                    self._bind(bucket)  # before the backward: it accumulates into the buffer

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        k, b = self._where[id(p)]
        kind = self.kinds[k]
        kind[2][b].pending -= 1
        while kind[3] < len(kind[2]) and kind[2][kind[3]].pending <= 0:
            self._launch(kind, kind[2][kind[3]])
            kind[3] += 1
            self.launched_in_backward += 1

    @staticmethod
    def _bind(bucket: _Bucket) -> None:
        """Make every gradient of the bucket a view into one flat buffer (DDP's
        ``gradient_as_bucket_view``): autograd accumulates straight into it, the all-reduce
        runs on it in place, and no gradient is copied into a bucket or back.  A gradient that
        was replaced by another tensor since (or never existed) is copied in / zeroed."""
        if bucket.flat is None:
            bucket.flat = torch.zeros(
                sum(p.numel() for p in bucket.params), dtype=bucket.params[0].dtype, device=bucket.params[0].device
            )
        base = bucket.flat.untyped_storage().data_ptr()
        offset = 0
        for p in bucket.params:
            n = p.numel()
            g = p.grad
            if g is None or g.untyped_storage().data_ptr() != base:
                view = bucket.flat[offset : offset + n].view_as(p)
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
                p.grad = view
            offset += n

    @classmethod
    def _launch(cls, kind, bucket: _Bucket) -> None:
        cls._bind(bucket)  # (a no-op while the gradients are still its views)
        bucket.work = dist.all_reduce(bucket.flat, group=kind[0], async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the rest, wait for every bucket, average into ``.grad``."""
        self.armed = False
        dp = self.state.dp_size
        for kind in self.kinds:
            group, size, buckets, _ = kind
            if size == 1:  # nothing to reduce: the expert shard is this rank's alone
                for p in (p for bucket in buckets for p in bucket.params):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for bucket in buckets for p in bucket.params]
                if grads and dp != 1:
                    torch._foreach_div_(grads, dp)
                continue
            while kind[3] < len(buckets):
                self._launch(kind, buckets[kind[3]])
                kind[3] += 1
            for bucket in buckets:
                bucket.work.wait()
                bucket.flat.div_(dp)  # the gradients are its views
                bucket.work = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
