"""Numerical helpers shared by every stage (numpy or torch in, the same type out)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["l2_normalize"]


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``x`` divided by its l2 norm along ``axis`` (numpy array or torch tensor, same type back).

    Norms below ``eps`` are replaced by ``eps``, so a zero vector stays zero instead of becoming NaN.
    Integer input is promoted to float32; float dtypes are kept.
    """
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=axis, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype, copy=False)
