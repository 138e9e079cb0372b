#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace cocos_kernels {

// x (B, Nx, C), y (B, Ny, C): prepared rows (centred, L2-normalised), contiguous, both float32
// or both float64. With d_ij = 1 - <x_i, y_j>, returns per row i (each (B, Nx)):
//   m      = min_j d_ij
//   argmin = the lowest j with d_ij == m (int64): the index the min's gradient flows through
//   s      = sum_j exp((m - d_ij) / c),  c = bandwidth * (m + dist_eps)   (max_j A_ij = 1 / s)
//   t      = sum_j exp((m - d_ij) / c) * d_ij                             (for the backward)
// holding one tile of d per thread, never the Nx x Ny matrix.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contextual_loss_forward(
    const at::Tensor& x, const at::Tensor& y, double bandwidth, double dist_eps);

// Gradients w.r.t. x and y (undefined where not requested) of a loss whose gradient w.r.t.
// s is grad_s (B, Nx), recomputing the tiles of d: through the sum (every j) and through
// the row minimum (the argmin's j only).
std::tuple<at::Tensor, at::Tensor> contextual_loss_backward(
    const at::Tensor& grad_s, const at::Tensor& x, const at::Tensor& y, const at::Tensor& m,
    const at::Tensor& argmin, const at::Tensor& s, const at::Tensor& t, double bandwidth,
    double dist_eps, bool need_dx, bool need_dy);

}  // namespace cocos_kernels
