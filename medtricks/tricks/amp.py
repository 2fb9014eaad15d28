"""Automatic mixed precision: forward and backward in 16-bit floats where safe, weights and updates in float32.

Paper: He et al. 2019 "Bag of Tricks" (arXiv 1812.01187) sec 3.2 (FP16 with loss scaling); Micikevicius et al. 2018
    "Mixed precision training" (arXiv 1710.03740). On CPU: bfloat16 autocast, which needs no loss scaling.
Hook: training step (torch.autocast around the forward and loss; a GradScaler for float16 on CUDA only).
Defaults: dtype auto (CUDA: bfloat16 where the GPU has it natively, else float16; CPU: bfloat16 where it is fast,
    else off).
Interactions: evaluation and attacks always run in float32 (DESIGN.md), whatever training used; the EMA and the
    optimizer keep float32 weights; distillation's teacher forward can share the autocast region.
Measured effect: not yet measured
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from medtricks.errors import RecipeError, short

logger = logging.getLogger(__name__)
AMP_DTYPES = ("auto", "bfloat16", "float16")


@dataclass(frozen=True)
class AmpConfig:
    """Recipe keys under `tricks.amp`.

    Attributes:
        dtype: auto | bfloat16 | float16 (float16 is CUDA-only).
    """

    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)


def _check_dtype(dtype: str) -> None:
    if dtype not in AMP_DTYPES:
        raise RecipeError(f"tricks.amp.dtype = {short(dtype)} must be one of {', '.join(AMP_DTYPES)}.")


def _cpu_has_bf16() -> bool:
    try:  # a private torch op, hence the guard: AVX512-class CPUs run bfloat16 matmuls fast through oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # any failure means "unknown", and float32 is the safe answer
        return False


def resolve_amp_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device`, or None when mixed precision should stay off.

    Args:
        device: the training device.
        dtype: auto | bfloat16 | float16.

    Returns:
        CPU: torch.bfloat16 when the CPU runs it fast, else None (logged). CUDA: bfloat16 (auto, where the GPU
        supports it natively) or float16. Other devices: the named dtype, None for auto.

    Raises:
        RecipeError: float16 on CPU, bfloat16 on a GPU without it, or an unknown dtype.
    """
    _check_dtype(dtype)
    device = torch.device(device)
    if device.type == "cpu":
        if dtype == "float16":
            raise RecipeError("tricks.amp.dtype = 'float16' is not supported on CPU; use bfloat16 (or auto).")
        if _cpu_has_bf16():
            return torch.bfloat16
        logger.info("amp: this CPU has no fast bfloat16 support; training stays in float32.")
        return None
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if dtype == "float16" or (dtype == "auto" and not native_bf16):
            return torch.float16
        if not native_bf16:
            raise RecipeError("tricks.amp.dtype = 'bfloat16': this GPU has no native bfloat16; use float16 or auto.")
        return torch.bfloat16
    if dtype == "auto":
        logger.info("amp: no automatic choice for device %s; training stays in float32.", device)
        return None
    return getattr(torch, dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `device` in `dtype`, or a context that does nothing when dtype is None.

    Example:
        >>> with autocast(device, resolve_amp_dtype(device)):
        ...     loss = criterion(model(images), targets)
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def create_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16 on CUDA (bfloat16 has float32's range and needs no loss scaling);
    a disabled scaler passes the loss and the optimizer step through unchanged."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)
