"""Compile every kernel once, so that a process that follows finds them in Numba's cache.

The launcher calls `warm_up()` before it starts workers: with `cache=True`, each kernel is
compiled once for the machine instead of once per process, and the processes start faster.
"""

from __future__ import annotations

import numpy as np

from kernels.aggregate import aggregate_mean, aggregate_median, aggregate_trimmed_mean
from kernels.conv import col2im, im2col, maxpool_backward, maxpool_forward
from kernels.dense import bias_relu_forward, relu_backward, relu_forward, softmax_cross_entropy
from kernels.norms import all_finite, clip_by_global_norm, global_norm
from kernels.optim import adam_update, amax, sgd_update
from kernels.optim_codes import sgd_update_codes
from kernels.precision import (
    bf16_all_finite,
    bf16_decode,
    bf16_encode,
    fp16_all_finite,
    fp16_decode,
    fp16_encode,
    round_to_bf16,
    round_to_fp16,
)
from kernels.privacy import outer_sq_norms

__all__ = ["warm_up"]


def warm_up() -> None:
    """Call each kernel on tiny arrays of the types that training uses."""
    x = np.ones((2, 3), np.float32)
    v = np.ones(3, np.float32)
    round_to_fp16(x)
    fp16_decode(fp16_encode(x))
    round_to_bf16(x)
    bf16_decode(bf16_encode(x))
    bias_relu_forward(x, v)
    relu_backward(x, x)
    relu_forward(x)
    image = np.ones((1, 1, 4, 4), np.float32)
    col2im(im2col(image, 3, 1, 1), image.shape, 3, 1, 1)
    pooled, argmax = maxpool_forward(image, 2)
    maxpool_backward(pooled, argmax, image.shape)
    softmax_cross_entropy(x, np.zeros(2, np.int64))
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    sgd_update(p, g, 0.1)
    sgd_update(p, g, 0.1, momentum=0.9, buf=np.zeros(3, np.float32))
    adam_update(p, g, np.zeros(3, np.float32), np.zeros(3, np.float32), 1, 1e-3)
    stack = np.ones((3, 3), np.float32)
    aggregate_mean(stack)
    aggregate_median(stack)
    aggregate_trimmed_mean(stack, 0.34)
    all_finite(v)
    amax(v)
    global_norm([v])
    clip_by_global_norm([np.ones(3, np.float32)], 1.0)
    outer_sq_norms(x, x)
    # Pulled weights and pushed gradients arrive as read-only views of message bytes, a
    # distinct type for Numba: compile those variants too.
    frozen = np.frombuffer(np.ones(3, np.float32).tobytes(), np.float32)
    all_finite(frozen)
    amax(frozen)
    sgd_update(p, frozen, 0.1)
    # A server updates straight from 16-bit gradient codes (async SGD), also read-only views.
    codes = np.frombuffer(fp16_encode(v).tobytes(), np.uint16)
    fp16_all_finite(codes)
    bf16_all_finite(codes)
    sgd_update_codes(p, codes, "float16", 0.1)
    sgd_update_codes(p, codes, "bfloat16", 0.1, scale=2.0)
