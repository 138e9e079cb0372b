#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace cocos_kernels {

// q (B, Nq, D), k (B, Nk, D), v (B, Cv, Nk), all contiguous float32 or float64; key_mask
// (B, Nk) bool or none: keys where it is false get no weight.
// Returns out (B, Cv, Nq) = softmax(scale * q k^T) v and the row logsumexp (B, Nq); a row
// whose keys are all masked gets out = 0 and lse = -inf.
std::tuple<at::Tensor, at::Tensor> correspondence_warp_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    const c10::optional<at::Tensor>& key_mask);

// Gradients w.r.t. q, k, v (undefined where not requested), recomputing the scores.
std::tuple<at::Tensor, at::Tensor, at::Tensor> correspondence_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool need_dq, bool need_dk,
    bool need_dv, const c10::optional<at::Tensor>& key_mask);

// The same warp with k x k window features (patch_size k) computed from C-wide rows without
// unfolding them: xq (B, Lq, C) / xk (B, Lk, C) are the zero-padded grids (row width width_q /
// width_k, centre i at row (k/2) * width + k/2 + i), mq / aq and mk / ak (B, N) each centre's
// window mean and 1 / (norm + eps); v (B, Cv, Nk), key_mask (B, Nk) as above.
std::tuple<at::Tensor, at::Tensor> correspondence_warp_windows_forward(
    const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq, const at::Tensor& xk,
    const at::Tensor& mk, const at::Tensor& ak, const at::Tensor& v, int64_t patch, int64_t width_q,
    int64_t width_k, double scale, const c10::optional<at::Tensor>& key_mask);

// Returns {dxq, dxk, dv, rows (2, B, Nq), cols (2, B, Nk)} (undefined where not requested): the
// gradients w.r.t. the padded rows through the window products, and per centre
// [sum_j H_ij m_j, sum_j dS_ij logit_ij] (rows) / the same summed over i (cols), from which the
// caller adds the gradients through the means and norms.
std::vector<at::Tensor> correspondence_warp_windows_backward(
    const at::Tensor& grad_out, const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq,
    const at::Tensor& xk, const at::Tensor& mk, const at::Tensor& ak, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t patch, int64_t width_q, int64_t width_k,
    double scale, bool need_dq, bool need_dk, bool need_dv, const c10::optional<at::Tensor>& key_mask);

}  // namespace cocos_kernels
