"""align: produce language-compatible vision encoders (KUEA kernel alignment, SAIL, freeze_align).

The public building blocks: losses, kernels, encoder-pair metrics, heads, the config system and the one
training loop. Encoders live in :mod:`align.encoders`, data in :mod:`align.data`, recipes in
:mod:`align.methods`.
"""

from align.heads import GLUHead, LinearHead, TextGlobalHead, TokenProjector
from align.kernels import cosine_kernel, gaussian_kernel, polynomial_kernel
from align.losses import anchor_loss, infonce_loss, kernel_alignment_loss, sigmoid_loss
from align.metrics.cka import linear_cka, mutual_knn, rbf_cka
from align.recipes import load_config, save_config
from align.train.config import TrainConfig
from align.train.guard import NonFiniteLossError
from align.train.loop import train
from align.train.method import Method, TrainResult

__all__ = [
    "GLUHead",
    "LinearHead",
    "Method",
    "NonFiniteLossError",
    "TextGlobalHead",
    "TokenProjector",
    "TrainConfig",
    "TrainResult",
    "anchor_loss",
    "cosine_kernel",
    "gaussian_kernel",
    "infonce_loss",
    "kernel_alignment_loss",
    "linear_cka",
    "load_config",
    "mutual_knn",
    "polynomial_kernel",
    "rbf_cka",
    "save_config",
    "sigmoid_loss",
    "train",
]
