"""Triton kernels for SD's hot ops. Each module holds the kernel, its launcher and a PyTorch reference (`*_ref`)."""

from .attention import attention, attention_ref
from .geglu import geglu, geglu_ref
from .group_norm import GroupNormTuning, group_norm, group_norm_ref
from .layer_norm import add_layer_norm, add_layer_norm_ref

__all__ = [
    "GroupNormTuning", "add_layer_norm", "add_layer_norm_ref", "attention", "attention_ref", "geglu", "geglu_ref",
    "group_norm", "group_norm_ref",
]
