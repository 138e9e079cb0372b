"""Backends declare what they support; `select` picks one or says why none can run.

A fused backend's `kernels()` returns one object implementing `cocos_kernels.kernels.Kernels`;
what it supports (`Backend.ops`, `Backend.features`) is declared here and never probed, so
answering needs no extension loaded.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .constants import FLOAT_DTYPES, OPS, OPTIONAL_FEATURES, PRECISIONS, TRITON_INTERPRETED
from .kernels import Kernels

__all__ = ["BACKENDS", "FLOAT_DTYPES", "OPS", "OPTIONAL_FEATURES", "PRECISIONS", "TRITON_INTERPRETED", "Backend",
           "backend_names", "choose", "register", "select"]


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # "auto" takes the highest-priority backend that accepts the input
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    fused: bool  # False: plain differentiable PyTorch (the reference)
    load: Callable[[], Kernels] | None = field(default=None, compare=False)
    # Devices "auto" may pick it for (None: all of `devices`); a backend can run somewhere
    # without being the right choice there (Triton's interpreter on CPU tensors: tests only).
    auto_devices: frozenset[str] | None = None
    # Further refusals beyond device and dtype: (device, dtype) -> reason or None.
    check: Callable[[torch.device, torch.dtype], str | None] | None = field(default=None, compare=False)
    # The ops (see OPS) and optional parts (see OPTIONAL_FEATURES) its kernels implement;
    # select() refuses a backend for a call that uses one it lacks. The reference has all.
    ops: frozenset[str] = OPS
    features: frozenset[str] = frozenset()

    def __post_init__(self):
        if not self.ops <= OPS or not self.features <= OPTIONAL_FEATURES:
            raise ValueError(f"backend {self.name!r} declares unknown ops or features: "
                             f"{sorted(self.ops - OPS)} {sorted(self.features - OPTIONAL_FEATURES)}")

    def kernels(self) -> Kernels:
        """The fused backend's kernels object, loaded once (ImportError / RuntimeError saying why not)."""
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
        if self.check is not None and (reason := self.check(device, dtype)) is not None:
            return reason
        return self.unavailable()

    def op_refusal(self, op: str) -> str | None:
        """Why this backend does not implement `op` (one of OPS), or None."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; the ops are {sorted(OPS)}")
        return None if not self.fused or op in self.ops else f"it does not implement {op}"

    def feature_refusal(self, features) -> str | None:
        """Why this backend cannot take a call using these optional arguments, or None. The
        reference does everything in plain PyTorch."""
        missing = sorted(set(features) - self.features) if self.fused else []
        if unknown := set(features) - OPTIONAL_FEATURES:
            raise ValueError(f"unknown features {sorted(unknown)}; the features are {sorted(OPTIONAL_FEATURES)}")
        return f"it does not implement {', '.join(missing)}" if missing else None

    def auto_refusal(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why backend="auto" does not pick this backend for these tensors, or None."""
        if self.auto_devices is not None and device.type not in self.auto_devices:
            return f"auto picks it only for {sorted(self.auto_devices)} tensors"
        return self.refusal(device, dtype)


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


@functools.cache
def _load(name: str):
    return BACKENDS[name].load()


def _load_cpu():
    from .cpu import kernels

    return kernels()


def _load_cuda():
    from .cuda import kernels

    return kernels()  # raises RuntimeError saying why it cannot run here (no device, failed build)


def _load_triton():
    from .triton import kernels

    return kernels()


def _triton_check(device: torch.device, dtype: torch.dtype) -> str | None:
    if TRITON_INTERPRETED and dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584)"
    return None


register(Backend("reference", 0, frozenset({"cpu", "cuda"}), FLOAT_DTYPES, fused=False))
register(Backend("cpu", 10, frozenset({"cpu"}), FLOAT_DTYPES, fused=True, load=_load_cpu,
                 features=frozenset({"key_mask", "windows"})))
# float64 is refused: the kernels accumulate in float32, and tl.dot on float64 is not available
# on every GPU triton 3.6 targets. float64 runs on the cpu backend or the reference.
register(Backend(
    "triton", 20, frozenset({"cuda", "cpu"} if TRITON_INTERPRETED else {"cuda"}),
    frozenset({torch.float16, torch.bfloat16, torch.float32}), fused=True, load=_load_triton,
    auto_devices=frozenset({"cuda"}), check=_triton_check, features=frozenset({"key_mask", "precision", "windows"}),
))
def _cuda_check(device: torch.device, dtype: torch.dtype) -> str | None:
    # Its kernels use sm_80 instructions (cp.async, ldmatrix, mma.sync) and shared memory.
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"its kernels need compute capability 8.0 or newer (A100, H100, ...), this card has {major}.{minor}"
    return None


# Below triton until it has run on a GPU; no float64 (float32 accumulation).
register(Backend("cuda", 15, frozenset({"cuda"}), frozenset({torch.float16, torch.bfloat16, torch.float32}),
                 fused=True, load=_load_cuda, check=_cuda_check,
                 features=frozenset({"key_mask", "precision", "windows"})))


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def select(name: str, device: torch.device, dtype: torch.dtype, op: str | None = None,
           features: tuple[str, ...] = ()) -> Backend:
    """The backend `name` ("auto" or a registered name) for these tensors, or a ValueError saying why not.

    With `op`, only a backend implementing that op qualifies (see `Backend.op_refusal`); with
    `features`, only one implementing those optional arguments (see `Backend.feature_refusal`).
    """
    if name == "auto":
        for backend in sorted(BACKENDS.values(), key=lambda b: -b.priority):
            if (backend.auto_refusal(device, dtype) is None and (op is None or backend.op_refusal(op) is None)
                    and backend.feature_refusal(features) is None):
                return backend
        wanted = "" if op is None else f" for {op}"
        raise ValueError(f"backend='auto': no backend accepts {device.type} {dtype} tensors{wanted}")
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {backend_names()}")
    backend = BACKENDS[name]
    reason = backend.refusal(device, dtype)
    if reason is None and op is not None:
        reason = backend.op_refusal(op)
    if reason is None:
        reason = backend.feature_refusal(features)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this input: {reason}")
    return backend


@torch.compiler.assume_constant_result
def _selected_name(op: str, name: str, device: torch.device, dtype: torch.dtype, features: tuple[str, ...]) -> str:
    # Selection may build an extension: torch.compile must take its answer, not trace it.
    return select(name, device, dtype, op, features).name


_warned_materialised: set[tuple[str, str]] = set()


def choose(op: str, name: str, device: torch.device, dtype: torch.dtype, features: tuple[str, ...] = ()) -> Backend:
    """`select` for a call of the public op `op`; says once per (op, device type) when "auto" had
    to fall back to the materialised reference."""
    backend = BACKENDS[_selected_name(op, name, device, dtype, tuple(features))]
    if not backend.fused and name == "auto" and (op, device.type) not in _warned_materialised:
        _warned_materialised.add((op, device.type))
        warnings.warn(
            f"cocos_kernels: no fused {op} for {device.type} tensors here; using the materialised "
            "reference (memory grows with (H*W)^2)", stacklevel=3,
        )
    return backend
