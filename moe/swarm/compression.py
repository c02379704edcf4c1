"""What a trainer peer's averagers put on the wire: fp32, fp16 or 8 bits, counted.

:class:`Traffic` counts the tensor bytes a peer's averagers send and receive (every part of
the reduce-scatter and of the all-gather, and state downloads), in counters shared with the
forked averager processes: ``counting(AveragerClass, traffic)`` is the averager class that
counts; hivemind's compression is applied by the averager's own process, which is where the
counting happens.

:class:`PeerCompression` wraps hivemind's codec (and counts what it encodes).  Its
``round_trip_`` puts a tensor through the codec part by part as the all-reduce will, with
optional error feedback (Seide et al. 2014; Karimireddy et al. 2019): what the codec takes
from a round is added to the next, so over rounds the sum of what a peer sent is the sum of
its updates up to one round's error, instead of each round's rounding being lost for good.

Why round-trip before averaging: hivemind's all-reduce gives a peer its *own* part plus the
(compressed) difference to the average, so with a lossy codec each peer ends up with the
average plus its own rounding error, and the peers' parameters drift apart round by round.
A peer whose part already is what the codec decodes (8 bits: nearly; fp16: exactly) ends up
with the same average as its mates, up to the rounding of the small differences.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp

import numpy as np
import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.compression import serialization as _serialization
from hivemind.compression.quantization import Uniform8BitQuantization, average_buckets

from moe.swarm.dht import WholeMessages

KINDS = ("none", "fp16", "int8")


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's 8-bit codec with ``extract`` working on numpy 2: hivemind reads the codebook
    size with ``int()`` of a one-element array, which numpy 2 refuses (TypeError), so
    every 8-bit all-reduce failed.  Registered in place of hivemind's (below), since a group
    mate decodes the parts by their type name."""

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False):
        # hivemind's scheme (bins of 6 sigma / 256 around the mean, each decoded to the mean of
        # its values) without torch.quantize_per_tensor, which warns of its removal on every part
        offset = self.n_bins // 2
        t = tensor.to(dtype=torch.float32, copy=not allow_inplace)
        centered = t - t.mean()
        std = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
        scale = float(self.RANGE_IN_SIGMAS * std / self.n_bins) or 1.0
        quantized = (centered / scale).round_().add_(offset).clamp_(0, self.n_bins - 1).to(torch.uint8)
        lookup = average_buckets(t, quantized, self.n_bins)
        return np.asarray(quantized, dtype=self.indices_dtype), np.asarray(lookup, dtype=self.codebook_dtype)

    def extract(self, serialized_tensor):
        buf = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buf, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buf, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buf, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
        codebook = torch.from_numpy(codebook.copy()).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


_serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()


class Traffic:
    """Tensor bytes sent and received by one peer's averagers (shared across processes)."""

    def __init__(self):
        self._sent = mp.Value(ctypes.c_double, 0.0)
        self._received = mp.Value(ctypes.c_double, 0.0)

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    @property
    def received(self) -> int:
        return int(self._received.value)

    def add(self, sent: int = 0, received: int = 0) -> None:
        if sent:
            with self._sent.get_lock():
                self._sent.value += sent
        if received:
            with self._received.get_lock():
                self._received.value += received

    def install(self) -> None:
        """Count in this (averager) process every tensor its all-reduce sends back or receives
        and every state part it downloads; the parts it sends out are counted by
        :class:`PeerCompression`."""
        from hivemind.averaging import allreduce, averager

        serialize, deserialize = allreduce.serialize_torch_tensor, allreduce.deserialize_torch_tensor

        def counted_serialize(*args, **kwargs):
            msg = serialize(*args, **kwargs)
            self.add(sent=len(msg.buffer))
            return msg

        def counted_deserialize(msg):
            self.add(received=len(msg.buffer))
            return deserialize(msg)

        allreduce.serialize_torch_tensor = counted_serialize
        allreduce.deserialize_torch_tensor = counted_deserialize
        averager.deserialize_torch_tensor = counted_deserialize


def counting(cls, traffic: Traffic):
    """A subclass of the averager ``cls`` whose process counts its tensor traffic in ``traffic``
    (and reads its commands whole: :class:`moe.swarm.dht.WholeMessages`)."""

    class Counting(cls):
        def run(self):  # the averager's own (forked) process
            traffic.install()
            self._inner_pipe = WholeMessages(self._inner_pipe)
            super().run()

    Counting.__name__ = Counting.__qualname__ = f"Counting{cls.__name__}"
    return Counting


def codec(kind: str) -> CompressionBase:
    """hivemind's codec for ``kind``: none (fp32), fp16, int8 (uniform over +-3 sigma, bucket means)."""
    if kind not in KINDS:
        raise ValueError(f"compression {kind!r}: choose one of {', '.join(KINDS)}")
    return {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8Bit}[kind]()


class PeerCompression(CompressionBase):
    """hivemind's ``kind`` codec, counting the bytes it encodes in ``traffic``."""

    def __init__(self, kind: str, *, traffic: Traffic | None = None):
        self.kind, self.inner = kind, codec(kind)
        self.compression_type = getattr(self.inner, "compression_type", None)
        self.traffic = traffic if traffic is not None else Traffic()

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False):
        msg = self.inner.compress(tensor, info, allow_inplace=allow_inplace)
        self.traffic.add(sent=len(msg.buffer))
        return msg

    def part_size(self, tensor: torch.Tensor) -> int:
        """Values per part the all-reduce splits ``tensor`` into (hivemind's rule)."""
        info = CompressionInfo.from_tensor(tensor)
        return max(1, int(DEFAULT_PART_SIZE_BYTES / (tensor.element_size() * self.estimate_compression_ratio(info))))

    @torch.no_grad()
    def round_trip_(self, tensor: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """Replace ``tensor`` by what its parts decode to on a group mate, part by part as the
        all-reduce splits it; with ``residual``, add it first and keep what the codec took
        (error feedback).  A peer that sends what it will be credited with makes the averaged
        result the same on every peer, up to the all-gather's rounding of small differences."""
        if self.kind == "none":
            return
        flat = tensor.view(-1)
        res = residual.view(-1) if residual is not None else None
        step = self.part_size(tensor)
        info = CompressionInfo.from_tensor(tensor)
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            v = part.float() + res[start : start + step] if res is not None else part.float()
            decoded = self.inner.extract(self.inner.compress(v.to(part.dtype), info)).reshape(-1).to(part.dtype)
            if res is not None:
                res[start : start + step] = v - decoded.float()
            part.copy_(decoded)

    def extract(self, serialized_tensor):
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)

    def __repr__(self) -> str:
        return f"PeerCompression({self.kind!r})"
