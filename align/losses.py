"""Losses shared by the alignment methods: sigmoid (SAIL/SigLIP), InfoNCE (freeze_align), kernel
alignment and L2 anchor (KUEA), learnable logit scales, and a cross-process feature gather.

Convention: ``logit_scale`` is always the *multiplier* applied to cosine similarities (``exp(t)`` for
a log-temperature ``t``, or ``1 / temperature``), as in open_clip's losses. ``LogitScale`` and
``Temperature`` below return it from their ``forward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LogitScale",
    "Temperature",
    "anchor_loss",
    "gather_features",
    "infonce_loss",
    "kernel_alignment_loss",
    "sigmoid_loss",
]

_REDUCTIONS = ("mean_pairs", "sum_per_image")


def _check_pair(image_emb: Tensor, text_emb: Tensor, name: str = "text_emb") -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"expected image_emb and {name} of shape [N, D], found {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and {name} must have the same shape [N, D] (row i of each is a positive pair), "
            f"found {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )


def _as_scalar(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"logit scale/bias must be a scalar, found shape {tuple(value.shape)}")
        return value.reshape(())
    return torch.tensor(float(value), device=like.device)


_FOLDS = 6  # 2**6 pairs share one log1p: their product of (1 + e) stays below 2**64, far from overflow


def _exact_softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` without ``F.softplus``'s cut-off (it returns ``x`` above 20)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _block_logits(ub: Tensor, v: Tensor, scale: Tensor, bias: Tensor, buffer: Tensor) -> Tensor:
    """``z = scale * ub @ v.T + bias`` in ``buffer[:len(ub)]``. Every block reuses the one buffer: fresh
    memory for each block costs as much as its matmul on CPU (page faults)."""
    z = buffer[: ub.shape[0]]
    if ub.dtype == z.dtype:
        torch.mm(ub, v.T, out=z)
    else:  # low-precision matmul, logits in float32
        z.copy_(ub @ v.T)
    return z.mul_(scale).add_(bias)


def _softplus_sum(z: Tensor, diag: int, work: Tensor) -> Tensor:
    """Float64 ``sum softplus(q)`` over a block of logits, ``q = z`` off and ``-z`` on its ``diag``-th
    diagonal: each pair's ``-logsigmoid(y z)``. Overwrites ``z`` and ``work`` (``z``'s shape).

    ``softplus(x) = max(x, 0) + log1p(e)``, ``e = exp(-|x|)``; over 64 pairs ``sum log1p(e_j) = log1p(q)``
    with ``1 + q = prod (1 + e_j)``, built by halving the row ``_FOLDS`` times with ``q = q_a + q_b + q_a q_b``
    (positive terms: exact to a few ulps). One ``log1p`` per 64 pairs instead of one per pair (the
    slowest elementwise kernel on CPU); the diagonal's terms are then swapped for ``softplus(-z)``.
    """
    zd = z.diagonal(offset=diag).to(torch.float64, copy=True)
    total = torch.clamp(z, min=0, out=work).sum().to(torch.float64)
    q, width = z.abs_().neg_().exp_(), z.shape[1]
    for _ in range(_FOLDS):
        if width < 2:
            break
        half = width // 2
        a, b = q[:, :half], q[:, half : 2 * half]
        ab = torch.mul(a, b, out=work[:, :half])
        a.add_(b).add_(ab)
        if width % 2:  # the odd column moves next to the folded ones
            q[:, half].copy_(q[:, width - 1])
        width = half + width % 2
    total += torch.log1p(q[:, :width]).sum().to(torch.float64)
    return total + (_exact_softplus(-zd) - _exact_softplus(zd)).sum()


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """Sum of ``-logsigmoid(y_ij z_ij)`` / ``denom`` over all pairs, computed in row blocks.

    ``z = scale * u @ v.T + bias`` with ``y`` = +1 on the diagonal, -1 elsewhere. Forward and
    backward each hold one or two ``[chunk, N]`` blocks at a time; backward recomputes the block's
    logits instead of keeping them, so memory is O(chunk * N + N * D) rather than O(N^2).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, chunk: int, denom: float) -> Tensor:
        with torch.autocast(u.device.type, enabled=False):  # explicit dtypes, same in backward
            cdtype = torch.promote_types(u.dtype, torch.float32)
            s_c, b_c = scale.detach().to(cdtype), bias.detach().to(cdtype)
            rows = min(chunk, u.shape[0])
            buffer = torch.empty(rows, v.shape[0], dtype=cdtype, device=u.device)
            work = torch.empty_like(buffer)
            total = torch.zeros((), dtype=torch.float64, device=u.device)
            for start in range(0, u.shape[0], chunk):
                z = _block_logits(u[start : start + chunk], v, s_c, b_c, buffer)
                total += _softplus_sum(z, start, work[: z.shape[0]])
        ctx.save_for_backward(u, v, scale, bias)
        ctx.chunk, ctx.denom = chunk, denom
        return (total / denom).to(cdtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        u, v, scale, bias = ctx.saved_tensors
        chunk, denom = ctx.chunk, ctx.denom
        cdtype = torch.promote_types(u.dtype, torch.float32)
        s_c, b_c = scale.to(cdtype), bias.to(cdtype)
        want_u, want_v, want_s, want_b = ctx.needs_input_grad[:4]
        grad_u = torch.empty_like(u) if want_u else None
        grad_v = torch.zeros_like(v, dtype=cdtype) if want_v else None
        grad_s = torch.zeros((), dtype=torch.float64, device=u.device)
        grad_b = torch.zeros((), dtype=torch.float64, device=u.device)
        with torch.autocast(u.device.type, enabled=False):
            buffer = torch.empty(min(chunk, u.shape[0]), v.shape[0], dtype=cdtype, device=u.device)
            for start in range(0, u.shape[0], chunk):
                ub = u[start : start + chunk]
                g = _block_logits(ub, v, s_c, b_c, buffer)
                diag = g.diagonal(offset=start)
                zd = diag.clone()
                g.sigmoid_()  # d softplus(z)/dz off the diagonal (y = -1)
                diag.copy_(torch.sigmoid(-zd).neg_())  # d softplus(-z)/dz on it (y = +1)
                if want_b:
                    grad_b += g.sum().to(torch.float64)
                g_mm = g.to(u.dtype)  # dL/dz (up to coeff) times v or u gives the input gradients
                if want_u or want_s:
                    gv = g_mm @ v
                    if want_s:  # sum_ij g_ij (u_i . v_j) = sum_i u_i . (g v)_i
                        grad_s += (ub.to(cdtype) * gv.to(cdtype)).sum(dtype=torch.float64)
                    if want_u:
                        grad_u[start : start + chunk] = gv
                if want_v:  # addmm's out= form: FlopCounterMode misses the in-place addmm_
                    if g_mm.dtype == grad_v.dtype:
                        torch.addmm(grad_v, g_mm.T, ub, out=grad_v)
                    else:
                        grad_v += g_mm.T @ ub
        coeff = grad_out.to(torch.float64) / denom
        factor = (coeff * scale.to(torch.float64)).to(cdtype)
        return (
            grad_u.mul_(factor.to(u.dtype)) if want_u else None,
            grad_v.mul_(factor).to(v.dtype) if want_v else None,
            (grad_s * coeff).to(scale.dtype) if want_s else None,
            (grad_b * coeff).to(bias.dtype) if want_b else None,
            None,
            None,
        )


def _direct_sigmoid(u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, denom: float) -> Tensor:
    logits = scale * (u @ v.T) + bias
    labels = 2.0 * torch.eye(u.shape[0], device=u.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / denom


def sigmoid_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    chunk_size: int | None = None,
    reduction: str = "mean_pairs",
    extra_text: Sequence[Tensor] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Pairwise sigmoid loss (SAIL / SigLIP) between matched rows of ``image_emb`` and ``text_emb``.

    Both inputs are L2-normalized here (``normalize=True``; harmless when already unit-norm). Logits
    are ``logit_scale * img @ txt.T + logit_bias`` with ``logit_scale`` the multiplier ``exp(t)``;
    labels are +1 on the diagonal and -1 elsewhere; the loss is ``-sum logsigmoid(labels * logits)``
    divided by ``N^2`` (``reduction="mean_pairs"``, SAIL) or by ``N`` (``"sum_per_image"``, SigLIP and
    open_clip's ``SigLipLoss``). ``extra_text``: further caption sets ``[N, D]`` (extra positives),
    each scored the same way; the result is the mean over all sets, i.e. the joint mean over every
    set's pairs. ``chunk_size``: compute in row blocks of that many images with blockwise
    gradients, so neither forward nor backward holds an ``N x N`` matrix; equal to the direct
    computation up to floating-point rounding.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"sigmoid_loss: reduction must be one of {_REDUCTIONS}, found {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"sigmoid_loss: chunk_size must be a positive int or None, found {chunk_size!r}")
    texts = [text_emb, *(extra_text or [])]
    for k, txt in enumerate(texts):
        _check_pair(image_emb, txt, "text_emb" if k == 0 else f"extra_text[{k - 1}]")
    n = image_emb.shape[0]
    if n == 0:
        raise ValueError("sigmoid_loss: empty batch (N = 0)")
    denom = float(n * n) if reduction == "mean_pairs" else float(n)
    scale, bias = _as_scalar(logit_scale, image_emb), _as_scalar(logit_bias, image_emb)
    u = F.normalize(image_emb, dim=-1) if normalize else image_emb
    total = 0.0
    for txt in texts:
        v = F.normalize(txt, dim=-1) if normalize else txt
        if v.dtype != u.dtype:  # e.g. one side from an autocast region: compute in the wider type
            wide = torch.promote_types(u.dtype, v.dtype)
            u, v = u.to(wide), v.to(wide)
        if chunk_size is None:
            total = total + _direct_sigmoid(u, v, scale, bias, denom)
        else:
            total = total + _ChunkedSigmoidLoss.apply(u, v, scale, bias, chunk_size, denom)
    return total / len(texts)


def infonce_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: float | Tensor, normalize: bool = True
) -> Tensor:
    """Symmetric InfoNCE (CLIP) loss: mean of image->text and text->image cross-entropy.

    ``logit_scale`` is the multiplier (``1 / temperature``, or ``exp(t)``); with unit-norm inputs this
    equals open_clip's ``ClipLoss()(img, txt, logit_scale)``. Inputs are L2-normalized here unless
    ``normalize=False``.
    """
    _check_pair(image_emb, text_emb)
    u = F.normalize(image_emb, dim=-1) if normalize else image_emb
    v = F.normalize(text_emb, dim=-1) if normalize else text_emb
    logits = _as_scalar(logit_scale, u) * (u @ v.T)
    labels = torch.arange(u.shape[0], device=u.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def scalar_parameter(value: float) -> nn.Parameter:
    """A learnable scalar stored with shape ``[1]``: DeepSpeed's engine cannot broadcast or flatten 0-d
    parameters ("self.dim() cannot be 0 to view Float as Byte")."""
    return nn.Parameter(torch.tensor([float(value)]))


class ScalarParameters(nn.Module):
    """A module of ``[1]``-shaped scalars (parameters or buffers) that also loads state dicts which stored
    them 0-d (written before they were ``[1]``)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        for name, tensor in {**self._parameters, **self._buffers}.items():
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(tensor.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LogitScale(ScalarParameters):
    """SAIL/SigLIP learnable logit scale and bias: ``forward() -> (exp(t), b)`` (0-d tensors).

    ``t`` starts at ``ln(init_scale)`` (ln 20) and ``clamp_()`` keeps it in
    ``[ln(min_scale), ln(max_scale)]`` = [0, ln 100]; ``b`` starts at ``init_bias`` (-10). Call
    ``clamp_()`` after every optimizer step.
    """

    def __init__(
        self,
        init_scale: float = 20.0,
        init_bias: float = -10.0,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError(
                f"LogitScale: need 0 < min_scale <= init_scale <= max_scale, found {min_scale}, {init_scale}, {max_scale}"
            )
        self.log_scale = scalar_parameter(math.log(init_scale))
        self.bias = scalar_parameter(init_bias)
        self.log_min, self.log_max = math.log(min_scale), math.log(max_scale)

    def forward(self) -> tuple[Tensor, Tensor]:
        """The multiplier ``exp(t)`` and the bias ``b``."""
        return self.log_scale[0].exp(), self.bias[0]

    @torch.no_grad()
    def clamp_(self) -> LogitScale:
        """Clamp the log-scale into its range in place (after an optimizer step)."""
        self.log_scale.clamp_(self.log_min, self.log_max)
        return self


class Temperature(ScalarParameters):
    """freeze_align learnable temperature ``tau``: ``forward() -> 1 / tau`` (the logit multiplier).

    Starts at ``init`` (0.07); ``clamp_()`` keeps it in ``[min_value, max_value]`` = [0.001, 0.5].
    Exclude it from weight decay.
    """

    def __init__(self, init: float = 0.07, min_value: float = 0.001, max_value: float = 0.5) -> None:
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(
                f"Temperature: need 0 < min <= init <= max, found {min_value}, {init}, {max_value}"
            )
        self.temperature = scalar_parameter(init)
        self.min_value, self.max_value = float(min_value), float(max_value)

    def forward(self) -> Tensor:
        """The logit multiplier ``1 / tau`` (a 0-d tensor)."""
        return 1.0 / self.temperature[0]

    @torch.no_grad()
    def clamp_(self) -> Temperature:
        """Clamp the temperature into its range in place (after an optimizer step)."""
        self.temperature.clamp_(self.min_value, self.max_value)
        return self


def kernel_alignment_loss(
    student_emb: Tensor,
    target_emb: Tensor,
    student_kernel: Callable[[Tensor], Tensor],
    target_kernel: Callable[[Tensor], Tensor],
) -> Tensor:
    """KUEA kernel term: ``mean_{i,j} (k_student(x_i, x_j) - k_target(y_i, y_j))^2`` over the batch.

    The kernels map ``[N, D]`` to ``[N, N]`` (e.g. modules from ``align.kernels``); the two
    embeddings may have different widths but must have the same rows.
    """
    if student_emb.ndim != 2 or target_emb.ndim != 2 or student_emb.shape[0] != target_emb.shape[0]:
        raise ValueError(
            "kernel_alignment_loss: expected student [N, D_s] and target [N, D_t] embeddings with the same N, "
            f"found {tuple(student_emb.shape)} and {tuple(target_emb.shape)}"
        )
    k_student = student_kernel(student_emb)
    k_target = target_kernel(target_emb)
    return (k_student - k_target.to(k_student.dtype)).pow(2).mean()


def anchor_loss(emb: Tensor, emb_frozen: Tensor) -> Tensor:
    """L2 anchor: squared distance summed over the last dim, averaged over all other dims.

    For ``[N, D]`` this is ``mean_i ||f(x_i) - f_0(x_i)||^2``; for tokens ``[B, T, D]`` the mean runs
    over batch and tokens. ``emb_frozen`` is detached (it is the frozen reference).
    """
    if emb.shape != emb_frozen.shape:
        raise ValueError(
            f"anchor_loss: emb and emb_frozen must have the same shape, found {tuple(emb.shape)} and {tuple(emb_frozen.shape)}"
        )
    diff = emb - emb_frozen.detach().to(emb.dtype)
    return diff.pow(2).sum(dim=-1).mean()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # noqa: ANN001 - autograd's signature
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * ctx.factor, None


def gather_features(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, in rank order, for contrastive negatives.

    Every process then computes the same loss of the whole gathered batch. Only the local slice
    carries gradient (the other slices are detached copies, as in open_clip's default gather), scaled
    by the world size: DDP's (or DeepSpeed's) average over processes of these partial gradients is
    then exactly the one-process gradient of the same global batch, for the features as for
    parameters every process shares (a logit scale). Ranks may hold different numbers of rows.
    Identity when ``torch.distributed`` is not initialized or has one process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    local = x.detach()
    if x.shape[0] < longest:
        pad = local.new_zeros((longest - x.shape[0], *x.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    pieces = [part[:count] for part, count in zip(parts, counts, strict=True)]
    pieces[rank] = _ScaleGrad.apply(x, float(world))
    return torch.cat(pieces)
