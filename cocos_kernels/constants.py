"""Names shared across the package: a leaf module (it imports only torch and os), so that the
dispatcher, the kernels and the op layer can all read them without importing one another."""
from __future__ import annotations

import os

import torch

# How float32 tile products may use tensor cores: full float32, split tf32 (near float32), tf32.
PRECISIONS = ("ieee", "tf32x3", "tf32")
# torch.get_float32_matmul_precision() -> the float32 tile-product precision it asks for.
MATMUL_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}

# The ops a fused backend may implement (Backend.ops) and the optional parts of them
# (Backend.features): "key_mask" and "precision" are kernel arguments, "windows" the k x k
# window kernels.
OPS = frozenset({"correspondence_warp", "contextual_loss"})
OPTIONAL_FEATURES = frozenset({"key_mask", "precision", "windows"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# Centring modes of the correlation prologue, and those with a window form (windows.py).
CENTER_MODES = ("channel", "spatial", None)
WINDOW_CENTERS = ("channel", None)

# The reference code adds this to the L2 norm (not inside the square root).
DEFAULT_EPS = 2.220446049250313e-16

# With TRITON_INTERPRET=1 (set before triton is imported) Triton kernels run on CPU tensors,
# slowly: that is how CI tests the Triton backend.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
