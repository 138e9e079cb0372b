"""Backends declare what they support; `select` picks one or says why none can run.

A fused backend's `kernels()` returns an object with the two kernel entry points that every
fused backend implements on prepared features (see `cocos_kernels/ops/correspondence_warp.py`):
  correspondence_warp_forward(q (B,Nq,D), k (B,Nk,D), v (B,Cv,Nk), scale) -> (out (B,Cv,Nq), lse (B,Nq))
  correspondence_warp_backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv)
      -> (dq, dk, dv), None where not requested
A backend declaring the feature "key_mask" takes `key_mask=` ((B, Nk) bool or None) in both;
one declaring "precision" takes `precision=` (one of PRECISIONS) in both, for its float32 tile
products; one declaring "windows" has the k x k window kernels (see `cocos_kernels/windows.py`).
A kernels object with `input_dtype(dtype)` takes the prepared features,
value and grad_out in that dtype (otherwise float32 for half inputs), and returns float32 gradients;
one with `prepare_features` / `prepare_features_backward` runs the prologue itself where they
return a tensor (None: the op layer's PyTorch prologue runs).

A backend implementing `contextual_loss` has two more (see `cocos_kernels/ops/contextual_loss.py`
and `csrc/cpu/contextual_loss.h`); `select(..., op=...)` skips or refuses one without them:
  contextual_loss_forward(x (B,Nx,C), y (B,Ny,C), bandwidth, dist_eps) -> (m, argmin, s, t), each (B, Nx)
  contextual_loss_backward(grad_s, x, y, m, argmin, s, t, bandwidth, dist_eps, need_dx, need_dy)
      -> (dx, dy), None where not requested
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# How float32 tile products may use tensor cores: full float32, split tf32 (near float32), tf32.
PRECISIONS = ("ieee", "tf32x3", "tf32")
# The ops a fused backend may implement (Backend.ops) and the optional parts of them
# (Backend.features): "key_mask" and "precision" are kernel arguments, "windows" the k x k
# window kernels. Declared, never probed: answering needs no extension loaded.
OPS = frozenset({"correspondence_warp", "contextual_loss"})
OPTIONAL_FEATURES = frozenset({"key_mask", "precision", "windows"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # "auto" takes the highest-priority backend that accepts the input
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    fused: bool  # False: plain differentiable PyTorch (the reference)
    load: Callable[[], object] | None = field(default=None, compare=False)
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
    from .cpu import extension

    return extension()


class _OpKernels:
    """A backend's kernels kept in one module per op: each attribute comes from the first module
    that has it, so the op layers see one kernels object."""

    def __init__(self, *modules):
        self._modules = modules

    def __getattr__(self, name: str):
        for module in self._modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"no kernel module has {name!r}")


def _load_cuda():
    from . import cuda

    cuda.extension()  # raises RuntimeError saying why it cannot run here (no device, failed build)
    return cuda


def _load_triton():
    from .triton import contextual_loss, correspondence_warp

    return _OpKernels(correspondence_warp, contextual_loss)


# With TRITON_INTERPRET=1 (set before triton is imported) Triton kernels run on CPU tensors,
# slowly: that is how CI tests the Triton backend, never what "auto" should choose.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


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
