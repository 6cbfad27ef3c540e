"""Checking a ``--device`` name before any work starts."""

from __future__ import annotations

from align.errors import UserError


def check_device(name: str) -> str:
    """``name`` if it is a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``)."""
    import torch

    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(
            f"'{name}' is not a device name; expected cpu, cuda, cuda:N, mps or auto ({err})"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"'{name}': no CUDA GPU is visible on this machine; use cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"'{name}': this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"'{name}': Apple MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(
            f"'{name}': unsupported device type '{device.type}'; expected cpu, cuda, cuda:N or mps"
        )
    return name
