"""The CUDA C++ backend ("cuda"): loader of the extension built from `csrc/cuda`, and its kernels.

`kernels()` returns its `CudaKernels` object (the contract every fused backend implements, see
`cocos_kernels/kernels.py`), with `key_mask=` and the "windows" kernels: `input_dtype` keeps
float16/bfloat16 features half (tensor-core products); the prologue `prepare_features` /
`prepare_features_backward` runs in CUDA for patch_size 1 with channel or no centring (None
otherwise, and the op layer's PyTorch prologue runs). k x k patches with channel or no centring are
never unfolded: the window kernels take the C-wide rows on a padded grid and per-centre window
scalars (cocos_kernels/windows.py), sum the k*k tap products per tile, and the backward returns one
gradient plane per tap. Spatial centring with patches unfolds in PyTorch (it has no window form).
`precision=` ("ieee", "tf32x3", "tf32", as triton's) says how float32 rows' tile products run:
float32 FMAs, or tensor cores on tf32 inputs split in two (near float32) or rounded once, in every
forward (rows and windows), in the backward on rows with D <= 128 (Cv <= 112 at D <= 64, Cv <= 80
at D <= 128) and in every other backward with Cv <= 64; FMAs elsewhere. Half inputs ignore it: tensor
cores everywhere (mma.sync; the backward beyond the register-resident kernels with Cv <= 192, WMMA
tiles above). contextual_loss takes float32 rows (the op layer prepares half inputs in float32).

The extension is, in this order: the module `cocos_kernels._cuda` that `setup.py` built at install
time, or a JIT build of the same sources with ninja (`torch.utils.cpp_extension.load`, cached in a
folder of its own per torch install, toolkit, architectures and sources, see `cocos_kernels/build.py`,
so only the first use pays the ~1-3 minutes). Nothing is built on `import cocos_kernels`: only when
the backend is first asked for, and only where a CUDA device is present (COCOS_KERNELS_JIT_CUDA=0
turns the JIT build off). One line on stderr says which extension the backend got; a failure says
why, and is remembered (the backend's refusal reason) instead of being retried on every call.
"""
from __future__ import annotations

import functools
import os

import torch

from . import build


def _why_not() -> str | None:
    """Why the CUDA backend cannot run on this machine at all, without building anything."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _jit_build():
    src = build.source_dir("cuda")
    if src is None:
        raise RuntimeError("the CUDA sources (csrc/cuda) are not installed next to cocos_kernels")
    build.build_environment()
    if build.cuda_home() is None:
        raise RuntimeError(build.NO_TOOLKIT)
    build.say("backend 'cuda': JIT-building the CUDA extension (no prebuilt cocos_kernels._cuda; "
              "the first build takes a few minutes, then it is cached)")
    return build.load("cocos_kernels_cuda", src, build.CUDA_SOURCES, cflags=build.CUDA_CXX_FLAGS,
                      cuda_cflags=build.NVCC_FLAGS)


@functools.cache
def _extension_or_error():
    if (reason := _why_not()) is not None:
        return None, reason
    try:
        from . import _cuda  # built by setup.py

        build.say("backend 'cuda': using the prebuilt extension cocos_kernels._cuda")
        return _cuda, None
    except ImportError:
        pass
    if os.environ.get("COCOS_KERNELS_JIT_CUDA") == "0":
        return None, "no prebuilt cocos_kernels._cuda, and COCOS_KERNELS_JIT_CUDA=0 turns the JIT build off"
    try:
        return _jit_build(), None
    except Exception as e:  # noqa: BLE001 -- remembered as the backend's refusal reason
        reason = f"building the CUDA extension failed: {str(e).strip()[-2000:]}"
        build.say(f"backend 'cuda' unavailable: {reason}")
        return None, reason


def extension():
    """The compiled module. Raises RuntimeError saying why where there is none (no CUDA device,
    not a CUDA build of torch, no toolkit, a failed build); the answer is cached."""
    module, reason = _extension_or_error()
    if module is None:
        raise RuntimeError(reason)
    return module


def _prologue_supported(center, patch_size) -> bool:
    # Spatial centring (a mean across positions) and patches (windows.py, or the unfold with spatial
    # centring) stay in PyTorch.
    return patch_size == 1 and center in ("channel", None)


class CudaKernels:
    """The `cocos_kernels.kernels.Kernels` contract over the extension (see the module doc)."""

    window_tap_planes = True

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype these kernels take features, value and grad_out in, for inputs of `dtype`."""
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32

    def correspondence_warp_forward(self, q, k, v, scale, key_mask=None, precision="ieee"):
        """out (B, Cv, Nq) in v's dtype and the float32 row logsumexp lse (B, Nq) of scale * q k^T;
        keys where key_mask ((B, Nk) bool) is False get no weight."""
        return extension().correspondence_warp_forward(q, k, v, float(scale), key_mask, precision)

    def correspondence_warp_backward(self, grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv, key_mask=None,
                                     precision="ieee"):
        """(dq, dk, dv) in float32, None where not requested."""
        return extension().correspondence_warp_backward(
            grad_out, q, k, v, out, lse.float().contiguous(), float(scale), bool(need_dq), bool(need_dk), bool(need_dv),
            key_mask, precision,
        )

    def correspondence_warp_windows_forward(self, xq, mq, aq, xk, mk, ak, v, patch, width_q, width_k, scale, key_mask=None,
                                            precision="ieee"):
        """The forward on k x k windows without the unfold (windows.py): xq (B, Lq, C) / xk (B, Lk, C)
        padded grids of rows of width width_q / width_k, mq / aq and mk / ak (B, N) float32 per-centre
        window means and score factors, v (B, Cv, Nk) and key_mask ((B, Nk) bool) on the key centres.
        Returns out (B, Cv, Nq) in v's dtype and the float32 lse (B, Nq) on the query centres.
        `precision` as for `correspondence_warp_forward` (float32 rows: "ieee" FMAs, "tf32x3" / "tf32"
        tensor cores)."""
        return extension().correspondence_warp_windows_forward(xq, mq, aq, xk, mk, ak, v, int(patch), int(width_q),
                                                               int(width_k), float(scale), key_mask, precision)

    def correspondence_warp_windows_backward(self, grad_out, xq, mq, aq, xk, mk, ak, v, out, lse, patch, width_q, width_k,
                                             scale, need_dq, need_dk, need_dv, key_mask=None, precision="ieee"):
        """The backward on k x k windows (arguments as `correspondence_warp_windows_forward`, plus its out
        and lse on the query centres, +inf at padding centres). Returns [planes_q (k*k, B, Nq, C), planes_k
        (k*k, B, Nk, C), dv (B, Cv, Nk), rows (2, B, Nq), cols (2, B, Nk)], float32, None where not
        requested: the per-tap gradient planes w.r.t. the padded rows through the window products (the op
        layer adds them, windows.sum_tap_planes), and per centre [sum_j H_ij m_j, sum_j dS_ij logit_ij]
        (see csrc/cpu/correspondence_warp.h). `precision` as for `correspondence_warp_windows_forward`
        (tensor cores with Cv <= 64, FMAs above; half inputs on tensor cores with Cv <= 192, WMMA above)."""
        return extension().correspondence_warp_windows_backward(
            grad_out, xq, mq, aq, xk, mk, ak, v, out, lse.float().contiguous(), int(patch), int(width_q), int(width_k),
            float(scale), bool(need_dq), bool(need_dk), bool(need_dv), key_mask, precision,
        )

    def prepare_features(self, x, center, normalize, patch_size, eps, dtype):
        """(B, C, H, W) -> rows (B, N, C) in `dtype`, centred/normalised in float32; None where the op
        layer's PyTorch prologue must do it (patches, spatial centring)."""
        if not _prologue_supported(center, patch_size):
            return None
        B, C = x.shape[:2]
        xs = x.reshape(B, C, -1).float().contiguous()
        rows = torch.empty((B, xs.shape[2], C), device=x.device, dtype=dtype)
        extension().prepare_features(xs, rows, center == "channel", bool(normalize), float(eps))
        return rows

    def prepare_features_backward(self, grad_rows, x, center, normalize, patch_size, eps):
        """Gradient w.r.t. x (float32, x's shape) of `prepare_features` given `grad_rows` (B, N, C);
        None where `prepare_features` is None."""
        if not _prologue_supported(center, patch_size):
            return None
        B, C = x.shape[:2]
        xs = x.reshape(B, C, -1).float().contiguous()
        dx = extension().prepare_features_backward(grad_rows.float().contiguous(), xs, center == "channel",
                                                    bool(normalize), float(eps))
        return dx.view(x.shape)

    def contextual_loss_forward(self, x, y, bandwidth, dist_eps):
        """Per-row (m, argmin, s, t), each (B, Nx), of float32 rows x (B, Nx, C), y (B, Ny, C): m, s, t
        float32, argmin int64 (the lowest j reaching the row minimum). See csrc/cuda/contextual_loss.h."""
        return extension().contextual_loss_forward(x, y, float(bandwidth), float(dist_eps))

    def contextual_loss_backward(self, grad_s, x, y, m, argmin, s, t, bandwidth, dist_eps, need_dx, need_dy):
        """(dx, dy) in float32 w.r.t. the rows, None where not requested."""
        return extension().contextual_loss_backward(
            grad_s.float().contiguous(), x, y, m, argmin, s, t, float(bandwidth), float(dist_eps), bool(need_dx),
            bool(need_dy),
        )


def kernels() -> CudaKernels:
    """The backend's kernels object. Raises RuntimeError saying why where there is no extension."""
    extension()
    return CudaKernels()
