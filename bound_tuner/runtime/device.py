"""The device a user names ("auto" by default) and the float32 matmul precision on it."""

from __future__ import annotations

import torch

AUTO = "auto"


DEFAULT_DEVICE = AUTO


DEFAULT_TF32 = True  # TF32 matmuls and convolutions for float32 on CUDA


class DeviceError(ValueError):
    """A device this process cannot use; its message is one line with the mend."""


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """The torch device for a name: "auto" (or None) is CUDA when present, else the CPU.

    Raises DeviceError for a name that is not a device, a device type other than cpu/cuda, or a
    CUDA device this process cannot see."""
    if device is None or (isinstance(device, str) and device == AUTO):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(
            f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:0"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: bound-tuner trains on cpu or cuda; use auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device} but this machine shows no CUDA GPU to this process "
                "(check the driver and CUDA_VISIBLE_DEVICES); use --device auto or cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


def set_tf32(enabled: bool = True) -> None:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (or not).

    On by default for CUDA trials (``[training] tf32``): the models here are small and trained
    with noisy gradients, where TF32's 10-bit mantissa inputs change nothing that a seed does not.
    No effect on the CPU."""
    set_fp32_precision(torch.backends.cuda.matmul, torch.backends.cudnn, enabled)


def set_fp32_precision(matmul, cudnn, enabled: bool) -> None:
    """TF32 on or off through whichever switch this torch has: ``fp32_precision`` ("tf32" or
    "ieee"; torch 2.9 and later, where the older flags are deprecated) or ``allow_tf32``
    (torch 2.4 to 2.8). ``matmul`` and ``cudnn`` are ``torch.backends.cuda.matmul`` and
    ``torch.backends.cudnn``."""
    if hasattr(matmul, "fp32_precision"):
        mode = "tf32" if enabled else "ieee"
        matmul.fp32_precision = mode
        cudnn.conv.fp32_precision = mode
    else:
        matmul.allow_tf32 = enabled
        cudnn.allow_tf32 = enabled
