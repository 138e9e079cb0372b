#pragma once
#include <ATen/ATen.h>

#include <tuple>

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

}  // namespace cocos_kernels
