"""What the kernel modules share: whether Triton can be used, and input checks for launchers."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

try:
    import triton  # noqa: F401  (imported for its availability only)

    HAS_TRITON = True
except ImportError:  # a CPU-only install without triton still has every reference path
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: Triton when it is importable and every tensor is on a CUDA device, unless the
    environment sets MSA_KERNELS=reference (the torch reference paths everywhere: to tell a kernel's
    fault from the model's on a new GPU)."""
    return HAS_TRITON and os.environ.get("MSA_KERNELS", "") != "reference" and all(t.is_cuda for t in tensors)


def require_triton() -> None:
    """Called by launchers after input checks: a clear error where triton is not installed."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: the Triton launchers need it (the references do not)")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    name: str,
    t: object,
    *,
    shape: str,
    ndim: int,
    dtypes: Iterable[torch.dtype],
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless t is a tensor of ndim dims, an allowed
    dtype, on `device` and contiguous; `shape` is the legend shown in the message ("[B, T, F]")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} dtype must be one of ({allowed}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t
