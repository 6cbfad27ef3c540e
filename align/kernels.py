"""Kernel matrices over a batch of embeddings (KUEA's kernel alignment).

Every function maps embeddings ``x [N, D]`` to a kernel matrix ``[N, N]``. Half-precision inputs are
computed in float32 (a cubic polynomial of bf16 dot products loses most of its digits).

The ``nn.Module`` wrappers hold the kernel parameters. Trainable ones are ordinary registered
``nn.Parameter`` objects, so they move with ``.to()``, reach the optimizer through ``.parameters()``
and are saved in ``state_dict()`` (the KUEA reference rebinds them to a device copy, so they never
train). Fixed ones are buffers: they move and save the same way but receive no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from align.losses import ScalarParameters, scalar_parameter

__all__ = [
    "KINDS",
    "CosineKernel",
    "GaussianKernel",
    "PolynomialKernel",
    "build_kernel",
    "cosine_kernel",
    "gaussian_kernel",
    "polynomial_kernel",
]

# Paper defaults (KUEA): target kernels are fixed, the student's (CLIP's) are trainable.
STUDENT_POLY_GAMMA = 0.0032
STUDENT_POLY_COEF0 = 0.191623
TARGET_GAUSSIAN_BANDWIDTH = 15.8
STUDENT_GAUSSIAN_BANDWIDTH = 8.7


def _as_matrix(x: Tensor, name: str = "x") -> Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected embeddings of shape [N, D], found shape {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def polynomial_kernel(
    x: Tensor, gamma: float | Tensor, coef0: float | Tensor, degree: int = 3, normalize: bool = True
) -> Tensor:
    """Polynomial kernel ``k(x, y) = (gamma x.y + coef0)^degree`` over the rows of ``x [N, D]``.

    With ``normalize`` the matrix is divided by ``sqrt(k(x, x) k(y, y))`` so its diagonal is 1
    (requires ``k(x, x) > 0``, true whenever ``gamma >= 0`` and ``coef0 > 0``).
    """
    x = _as_matrix(x)
    dots = x @ x.T
    kernel = (gamma * dots + coef0) ** degree
    if normalize:
        diag = (gamma * (x * x).sum(dim=-1) + coef0) ** degree
        scale = diag.clamp_min(torch.finfo(diag.dtype).tiny).rsqrt()
        kernel = kernel * scale[:, None] * scale[None, :]
    return kernel


def gaussian_kernel(x: Tensor, bandwidth: float | Tensor) -> Tensor:
    """Gaussian kernel ``k(x, y) = exp(-||x - y||^2 / (2 bandwidth^2))`` over the rows of ``x``."""
    x = _as_matrix(x)
    sq_norms = (x * x).sum(dim=-1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    sq_dist = sq_dist * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))
    return torch.exp(-sq_dist / (2.0 * bandwidth**2))


def cosine_kernel(x: Tensor) -> Tensor:
    """Cosine-similarity kernel ``k(x, y) = x.y / (||x|| ||y||)`` over the rows of ``x``."""
    x = _as_matrix(x)
    unit = nn.functional.normalize(x, dim=-1)
    return unit @ unit.T


def _scalar(module: nn.Module, name: str, value: float, trainable: bool) -> None:
    """``name`` as a ``[1]`` parameter (trainable: DeepSpeed flattens no 0-d one) or a fixed buffer."""
    if trainable:
        module.register_parameter(name, scalar_parameter(value))
    else:
        module.register_buffer(name, torch.tensor([float(value)]))


def _read(scalar: Tensor) -> float:
    """The value of a kernel scalar. Under DeepSpeed ZeRO-3 a trainable one is partitioned outside the
    kernel's forward (this process may hold none of it): gathered first, by every process at once, as the
    training step logs it on every process."""
    if hasattr(scalar, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([scalar]):
            return float(scalar.detach())
    return float(scalar.detach())


class PolynomialKernel(ScalarParameters):
    """Normalized polynomial kernel with ``gamma`` and ``coef0`` as parameters or fixed buffers."""

    def __init__(
        self, gamma: float, coef0: float, degree: int = 3, trainable: bool = False, normalize: bool = True
    ) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"PolynomialKernel: degree must be >= 1, found {degree}")
        _scalar(self, "gamma", gamma, trainable)
        _scalar(self, "coef0", coef0, trainable)
        self.degree = int(degree)
        self.normalize = normalize
        self.trainable = trainable

    def forward(self, x: Tensor) -> Tensor:
        """Kernel matrix ``[N, N]`` of ``x [N, D]``."""
        return polynomial_kernel(x, self.gamma, self.coef0, self.degree, self.normalize)

    def values(self) -> dict[str, float]:
        """Current parameter values, for logging."""
        return {"gamma": _read(self.gamma), "coef0": _read(self.coef0)}

    def extra_repr(self) -> str:
        vals = ", ".join(f"{k}={v:.6g}" for k, v in self.values().items())
        return f"{vals}, degree={self.degree}, trainable={self.trainable}"


class GaussianKernel(ScalarParameters):
    """Gaussian kernel with its bandwidth as a parameter or a fixed buffer (sign is irrelevant)."""

    def __init__(self, bandwidth: float, trainable: bool = False) -> None:
        super().__init__()
        if not math.isfinite(float(bandwidth)):
            raise ValueError(f"gaussian kernel: bandwidth must be finite, found {bandwidth}")
        if not bandwidth > 0:
            raise ValueError(f"GaussianKernel: bandwidth must be > 0, found {bandwidth}")
        _scalar(self, "bandwidth", bandwidth, trainable)
        self.trainable = trainable

    def forward(self, x: Tensor) -> Tensor:
        """Kernel matrix ``[N, N]`` of ``x [N, D]``."""
        return gaussian_kernel(x, self.bandwidth)

    def values(self) -> dict[str, float]:
        """Current parameter values, for logging."""
        return {"bandwidth": _read(self.bandwidth)}

    def extra_repr(self) -> str:
        return f"bandwidth={float(self.bandwidth.detach()):.6g}, trainable={self.trainable}"


class CosineKernel(nn.Module):
    """Cosine-similarity kernel (no parameters)."""

    trainable = False

    def forward(self, x: Tensor) -> Tensor:
        """Kernel matrix ``[N, N]`` of ``x [N, D]``."""
        return cosine_kernel(x)

    def values(self) -> dict[str, float]:
        """No parameters: an empty dict."""
        return {}


def _polynomial_defaults(dim: int, student: bool) -> dict[str, float | int | bool]:
    if dim < 1:
        raise ValueError(f"polynomial kernel: embedding dim must be >= 1, found {dim}")
    return {
        "gamma": STUDENT_POLY_GAMMA if student else 1.0 / dim,
        "coef0": STUDENT_POLY_COEF0 if student else 1.0,
        "degree": 3,
        "trainable": student,
    }


def _gaussian_defaults(dim: int, student: bool) -> dict[str, float | int | bool]:
    bandwidth = STUDENT_GAUSSIAN_BANDWIDTH if student else TARGET_GAUSSIAN_BANDWIDTH
    return {"bandwidth": bandwidth, "trainable": student}


@dataclass(frozen=True)
class KernelKind:
    """A kernel kind: its module, the options it accepts, and KUEA's defaults ``(dim, student) -> kwargs``."""

    module: Callable[..., nn.Module]
    options: frozenset[str]
    defaults: Callable[[int, bool], dict[str, float | int | bool]]


KINDS: dict[str, KernelKind] = {
    "polynomial": KernelKind(
        PolynomialKernel,
        frozenset({"gamma", "coef0", "degree", "trainable", "normalize"}),
        _polynomial_defaults,
    ),
    "gaussian": KernelKind(GaussianKernel, frozenset({"bandwidth", "trainable"}), _gaussian_defaults),
    "cosine": KernelKind(CosineKernel, frozenset(), lambda dim, student: {}),
}
_ALIASES = {"poly": "polynomial", "rbf": "gaussian", **{kind: kind for kind in KINDS}}


def build_kernel(name: str, dim: int, role: str = "target", **overrides: float | int | bool) -> nn.Module:
    """A kernel module with KUEA's defaults for ``role`` ("target" fixed, "student" trainable).

    Polynomial: target ``gamma = 1/dim, coef0 = 1`` fixed; student ``gamma = 0.0032,
    coef0 = 0.191623`` trainable; degree 3, normalized. Gaussian: bandwidth 15.8 (target, fixed) or
    8.7 (student, trainable). Cosine: no parameters. ``overrides`` replace any default.
    """
    kind = _ALIASES.get(name.lower())
    if kind is None:
        raise ValueError(f"unknown kernel {name!r}: expected one of {sorted(_ALIASES)}")
    if role not in ("target", "student"):
        raise ValueError(f"kernel role must be 'target' or 'student', found {role!r}")
    spec = KINDS[kind]
    unknown = set(overrides) - spec.options
    if unknown:
        raise ValueError(
            f"kernel {kind!r}: unknown option(s) {sorted(unknown)}; allowed {sorted(spec.options)}"
        )
    return spec.module(**{**spec.defaults(dim, role == "student"), **overrides})
