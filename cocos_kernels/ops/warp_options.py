"""`WarpOptions`: the matching options every warp op takes, checked once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import DEFAULT_EPS, MATMUL_PRECISION, PRECISIONS
from ..validation import check_positive, check_prologue_options


@torch.compiler.assume_constant_result
def default_precision() -> str:
    """The precision torch.get_float32_matmul_precision() asks for (precision=None)."""
    return MATMUL_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


@dataclass(frozen=True)
class WarpOptions:
    """The arguments of `correspondence_warp` of the same names (see its docstring), checked on
    construction (ValueError / TypeError naming the argument). correspondence_warp, cycle_warp,
    warp_image, CorrespondenceWarp and correspondence_topk / correspondence_argmax (which ignore
    temperature and precision) build one from their keyword arguments."""

    temperature: float = 0.01
    center: str | None = "channel"
    normalize: bool = True
    patch_size: int = 1
    eps: float = DEFAULT_EPS
    precision: str | None = None

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_prologue_options(self.center, self.normalize, self.patch_size, self.eps)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be None or one of {PRECISIONS}, got {self.precision!r}")

    @property
    def prologue(self) -> tuple:
        """(center, normalize, patch_size, eps): the feature preparation's options."""
        return self.center, self.normalize, int(self.patch_size), float(self.eps)

    def op_args(self, backend: str) -> tuple:
        """The custom ops' positional scalars: (temperature, center, normalize, patch_size, eps, backend,
        precision), precision None resolved (`default_precision`)."""
        precision = default_precision() if self.precision is None else self.precision
        return (float(self.temperature), *self.prologue, backend, precision)
