"""Numba-JIT numerics for tinyps: 16-bit float emulation, dense-layer pieces, the loss,
convolution (im2col, col2im) and max-pooling, optimizer updates, gradient aggregation, norms
and per-example norms (DP-SGD). Imports NumPy and Numba only (with llvmlite, the code
generator Numba comes with, for an intrinsic).

Every kernel has a plain-NumPy twin in tests/twins/ that specifies what it computes.
"""

from kernels.aggregate import aggregate_mean, aggregate_median, aggregate_trimmed_mean
from kernels.conv import col2im, conv_out_size, im2col, maxpool_backward, maxpool_forward
from kernels.dense import bias_relu_forward, relu_backward, relu_forward, softmax_cross_entropy
from kernels.matmul import blocked_matmul
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

__all__ = [
    "adam_update",
    "aggregate_mean",
    "aggregate_median",
    "aggregate_trimmed_mean",
    "all_finite",
    "amax",
    "bf16_all_finite",
    "bf16_decode",
    "bf16_encode",
    "bias_relu_forward",
    "blocked_matmul",
    "clip_by_global_norm",
    "col2im",
    "conv_out_size",
    "fp16_all_finite",
    "fp16_decode",
    "fp16_encode",
    "global_norm",
    "im2col",
    "maxpool_backward",
    "maxpool_forward",
    "outer_sq_norms",
    "relu_backward",
    "relu_forward",
    "round_to_bf16",
    "round_to_fp16",
    "sgd_update",
    "sgd_update_codes",
    "softmax_cross_entropy",
]
