"""Backends declare what they support; `select` picks one or says why none can run.

A fused backend's `kernels()` returns an object with the two kernel entry points that every
fused backend implements on prepared features (see `cocos_kernels/ops/correspondence_warp.py`):
  correspondence_warp_forward(q (B,Nq,D), k (B,Nk,D), v (B,Cv,Nk), scale) -> (out (B,Cv,Nq), lse (B,Nq))
  correspondence_warp_backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv)
      -> (dq, dk, dv), None where not requested
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # "auto" takes the highest-priority backend that accepts the input
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    fused: bool  # False: plain differentiable PyTorch (the reference)
    load: Callable[[], object] | None = field(default=None, compare=False)

    def kernels(self):
        return _load(self.name)

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None."""
        if self.load is None:
            return None
        try:
            self.kernels()
        except (ImportError, RuntimeError) as e:
            return str(e)
        return None

    def refusal(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot take tensors of this device and dtype, or None."""
        if device.type not in self.devices:
            return f"it runs on {sorted(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            return f"it takes {sorted(str(d) for d in self.dtypes)}, not {dtype}"
        return self.unavailable()


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


@functools.cache
def _load(name: str):
    return BACKENDS[name].load()


def _load_cpu():
    from .cpu import extension

    return extension()


register(Backend("reference", 0, frozenset({"cpu", "cuda"}), FLOAT_DTYPES, fused=False))
register(Backend("cpu", 10, frozenset({"cpu"}), FLOAT_DTYPES, fused=True, load=_load_cpu))


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def select(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend `name` ("auto" or a registered name) for these tensors, or a ValueError saying why not."""
    if name == "auto":
        for backend in sorted(BACKENDS.values(), key=lambda b: -b.priority):
            if backend.refusal(device, dtype) is None:
                return backend
        raise ValueError(f"backend='auto': no backend accepts {device.type} {dtype} tensors")
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {backend_names()}")
    backend = BACKENDS[name]
    reason = backend.refusal(device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this input: {reason}")
    return backend
