"""Argument checks shared by the public ops: each error names the argument, what it got and
what is allowed."""
from __future__ import annotations

import math
import numbers

import torch

from .constants import CENTER_MODES, FLOAT_DTYPES
from .dispatch import backend_names


def check_feature_map(name: str, x) -> None:
    """A non-empty 4-D (B, C, H, W) floating tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def check_warp_maps(query, key, value, key_mask) -> None:
    """The maps of the warp ops: query (B, C, Hq, Wq), key (B, C, Hk, Wk), value (B, Cv, Hk, Wk) of one
    dtype and device, and key_mask (see `check_key_mask`)."""
    maps = {"query": query, "key": key, "value": value}
    for name, x in maps.items():
        check_feature_map(name, x)
    check_same_dtype_and_device(maps)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"query, key and value must have the same batch size: {shapes}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query and key must have the same number of channels: {shapes}")
    if value.shape[2:] != key.shape[2:]:
        raise ValueError(f"value must be on the key's grid (H, W): {shapes}")
    check_key_mask(key_mask, key)


def check_same_dtype_and_device(tensors: dict[str, torch.Tensor]) -> None:
    names = ", ".join(tensors)
    dtypes, devices = [t.dtype for t in tensors.values()], [t.device for t in tensors.values()]
    if len(set(dtypes)) > 1:
        raise TypeError(f"{names} must share one dtype, got {', '.join(map(str, dtypes))}")
    if len(set(devices)) > 1:
        raise ValueError(f"{names} must be on one device, got {', '.join(map(str, devices))}")


def check_positive(name: str, value) -> None:
    """A finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_backend(backend) -> None:
    check_choice("backend", backend, backend_names())


def check_prologue_options(center, normalize, patch_size, eps) -> None:
    """The options of the correlation prologue (features.normalize_features), as every op takes them."""
    check_choice("center", center, CENTER_MODES)
    check_normalize(normalize)
    check_patch_size(patch_size)
    check_eps(eps)


def check_patch_size(patch_size) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be an odd integer >= 1, got {patch_size!r}")


def check_normalize(normalize) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")


def check_top_k(name: str, k, key: torch.Tensor) -> None:
    """An integer in [1, Hk * Wk]."""
    nk = key.shape[2] * key.shape[3]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= nk:
        raise ValueError(f"{name} must be an integer in [1, {nk}] (the key grid's Hk*Wk), got {k!r}")


def check_key_mask(key_mask, key) -> None:
    """None, or a bool (B, Hk, Wk) tensor on key's device."""
    if key_mask is None:
        return
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be None or a torch.Tensor, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = may be matched), got dtype {key_mask.dtype}")
    B, _, Hk, Wk = key.shape
    if tuple(key_mask.shape) != (B, Hk, Wk):
        raise ValueError(f"key_mask must have shape (B, Hk, Wk) = {(B, Hk, Wk)} of the key, got {tuple(key_mask.shape)}")
    if key_mask.device != key.device:
        raise ValueError(f"key_mask is on {key_mask.device} but key is on {key.device}")


def check_finite_values(maps: dict, check_finite: bool) -> None:
    """With check_finite=True, every tensor in `maps` must be free of NaN and Inf (one reduction
    per tensor; by default they are not checked and propagate exactly as in the reference)."""
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if not check_finite:
        return
    for name, t in maps.items():
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"{name} has {int(bad.sum())} non-finite (NaN/Inf) entries, the first at index "
                             f"{first}: {t.detach()[first].item()}; check_finite=True rejects them "
                             "(check_finite=False lets them propagate as in the reference)")
