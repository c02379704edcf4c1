"""FLOPs formula, peak-FLOP/s measurement and MFU arithmetic."""

import math
import time

import pytest
import torch

from moe.training.flops import measure_peak_flops, mfu, transformer_flops_per_token


def test_transformer_flops_per_token_hand_numbers():
    # N = 1e6, L = 4, d = 256, T = 128: 12 * 4 * 256 * 128 = 1_572_864
    assert transformer_flops_per_token(1_000_000, 4, 256, 128) == 6_000_000 + 1_572_864
    assert transformer_flops_per_token(1_000_000, 4, 256, 128, training=False) == 2_000_000 + 524_288
    # training is exactly 3x forward (backward = 2x forward)
    fwd = transformer_flops_per_token(123, 2, 64, 32, training=False)
    assert transformer_flops_per_token(123, 2, 64, 32) == pytest.approx(3 * fwd)
    with pytest.raises(ValueError):
        transformer_flops_per_token(-1, 1, 1, 1)


def test_measure_peak_flops_short():
    t0 = time.perf_counter()
    peak = measure_peak_flops("cpu", seconds=0.1, n=256)
    took = time.perf_counter() - t0
    assert math.isfinite(peak) and peak > 1e6  # any CPU does more than a MFLOP/s
    assert took < 5.0
    assert measure_peak_flops(torch.device("cpu"), dtype=torch.bfloat16, seconds=0.05, n=64) > 0
    with pytest.raises(ValueError):
        measure_peak_flops("cpu", seconds=0)


def test_mfu_arithmetic():
    assert mfu(1000.0, 6e6, 1.2e10) == pytest.approx(0.5)
    assert mfu(0.0, 6e6, 1e9) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
