"""Convolution autotuning: cuDNN's benchmark mode on a GPU, and its counterpart for the CPU.

On the CPU, PyTorch runs a convolution either with oneDNN or with its native im2col + GEMM kernel. oneDNN is the
default and the faster one for large images, but for small feature maps with many channels (SD's 1280-channel blocks
on a 16 x 16 latent: 128 px) it can be 2-5x slower than a plain GEMM. `autotune_convolutions` times both once for
each new (weights, input) shape and keeps the faster. The two kernels agree to rounding, so results can differ from
an untuned run in the last bits; leave it off where bit-for-bit reproducibility matters more than speed.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import torch

log = logging.getLogger("sdd")
_CHOICE: dict[tuple, bool] = {}  # conv signature -> use oneDNN (shared by every module in the process)


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _with_onednn(enabled: bool, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run fn with oneDNN convolutions switched on or off (restored afterwards)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        return fn()
    finally:
        torch.backends.mkldnn.enabled = before


def _tuned_conv_forward(conv: torch.nn.Conv2d, repeats: int, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Conv2d._conv_forward with the backend chosen (and, the first time, timed) for this signature."""
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype, conv.stride, conv.padding, conv.dilation,
           conv.groups, conv.padding_mode)
    run = functools.partial(torch.nn.Conv2d._conv_forward, conv, x, weight, bias)
    if key not in _CHOICE:
        with torch.no_grad():
            t_onednn = _best_of(lambda: _with_onednn(True, run), repeats)
            t_native = _best_of(lambda: _with_onednn(False, run), repeats)
        _CHOICE[key] = t_onednn <= t_native
        log.debug("conv %s x %s: oneDNN %.2f ms, native %.2f ms", tuple(weight.shape), tuple(x.shape),
                  1e3 * t_onednn, 1e3 * t_native)
    return _with_onednn(_CHOICE[key], run)


def autotune_convolutions(model: torch.nn.Module, device: torch.device, repeats: int = 3) -> int:
    """Let `model`'s convolutions pick their fastest kernel per input shape; returns how many are tuned on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return 0
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        m._conv_forward = functools.partial(_tuned_conv_forward, m, repeats)
    return len(convs)


def choices() -> dict[str, int]:
    """How many conv signatures chose each backend so far (for the log)."""
    onednn = sum(_CHOICE.values())
    return {"oneDNN": onednn, "native": len(_CHOICE) - onednn}
