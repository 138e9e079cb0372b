"""Triton kernels, one module per op (`correspondence_warp`, `contextual_loss`). Imported lazily
by the dispatcher, so that `import cocos_kernels` works where triton is not installed."""
