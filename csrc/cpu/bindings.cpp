// Python bindings of the CPU extension; the torch.library ops live in cocos_kernels/ops.
#include <torch/extension.h>

#include "contextual_loss.h"
#include "correspondence_warp.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("correspondence_warp_forward", &cocos_kernels::correspondence_warp_forward,
        "fused correspondence warp forward (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("scale"), py::arg("key_mask") = py::none());
  m.def("correspondence_warp_backward", &cocos_kernels::correspondence_warp_backward,
        "fused correspondence warp backward (dq, dk, dv)", py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("need_dq"), py::arg("need_dk"), py::arg("need_dv"),
        py::arg("key_mask") = py::none());
  m.def("correspondence_warp_windows_forward", &cocos_kernels::correspondence_warp_windows_forward,
        "fused correspondence warp on k x k windows, forward (out, lse)", py::arg("xq"), py::arg("mq"),
        py::arg("aq"), py::arg("xk"), py::arg("mk"), py::arg("ak"), py::arg("v"), py::arg("patch"),
        py::arg("width_q"), py::arg("width_k"), py::arg("scale"), py::arg("key_mask") = py::none());
  m.def("correspondence_warp_windows_backward", &cocos_kernels::correspondence_warp_windows_backward,
        "fused correspondence warp on k x k windows, backward [dxq, dxk, dv, rows, cols]",
        py::arg("grad_out"), py::arg("xq"), py::arg("mq"), py::arg("aq"), py::arg("xk"), py::arg("mk"),
        py::arg("ak"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("patch"), py::arg("width_q"),
        py::arg("width_k"), py::arg("scale"), py::arg("need_dq"), py::arg("need_dk"), py::arg("need_dv"),
        py::arg("key_mask") = py::none());
  m.def("contextual_loss_forward", &cocos_kernels::contextual_loss_forward,
        "fused contextual loss forward: per-row (m, argmin, s, t)");
  m.def("contextual_loss_backward", &cocos_kernels::contextual_loss_backward,
        "fused contextual loss backward (dx, dy)");
}
