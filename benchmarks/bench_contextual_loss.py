"""The implementations of contextual_loss that the benchmark suite compares (see run.py).

The loss between two feature maps of one VGG-19 layer at the sizes CoCosNet's contextual loss
sees them, unpooled (the reference code average-pools relu3_2 by 2 and relu2_2 by 4 to afford
the N x N matrix): relu2_2 (C=128, image side / 2), relu3_2 (C=256, / 4), relu4_2 (C=512, / 8),
relu5_2 (C=512, / 16). Features are non-negative (post-ReLU) random maps; "forward" runs under
torch.no_grad(), "forward+backward" makes x (the generated image's features) require grad, as in
training where the exemplar's features are detached, and back-propagates a fixed random (B,)
gradient. Implementations: `reference` (the materialised formula) and every fused backend of
`cocos_kernels.BACKENDS` for the device that implements contextual_loss.
"""
from __future__ import annotations

from benchmarks.harness import SEED, Refused

BANDWIDTH = 0.1
# layer -> (channels, image side / feature side)
LAYERS = {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8), "relu5_2": (512, 16)}


def impls(device: str) -> list[str]:
    """The reference, then the fused backends registered for `device` (whether one implements
    the op and can run here is decided, and recorded, by each config's worker)."""
    import cocos_kernels as ck

    return ["reference", *(name for name, b in ck.BACKENDS.items() if b.fused and device in b.devices)]


def flops(config: dict) -> float:
    """Useful FLOPs of one call: 2 * Nx * Ny * C per batch element for the pairwise similarities;
    forward+backward counts 2x that (the gradient of x is one more product of the same size)."""
    n = config["side"] ** 2
    forward = 2.0 * config["batch"] * n * n * config["channels"]
    return forward if config["mode"] == "forward" else 2.0 * forward


def make_step(config: dict, side: int):
    """Inputs of this config at `side`, and a function running one call of its impl and mode."""
    import torch

    import cocos_kernels as ck

    device, dtype, impl = torch.device(config["device"]), getattr(torch, config["dtype"]), config["impl"]
    try:
        ck.select(impl, device, dtype, op="contextual_loss")
    except ValueError as e:
        raise Refused(str(e)) from None
    gen = torch.Generator().manual_seed(SEED)
    B, C = config["batch"], config["channels"]
    x, y = (torch.randn(B, C, side, side, generator=gen).relu_().to(device, dtype) for _ in range(2))
    center = config.get("center", "channel")

    if config["mode"] == "forward":
        def step():
            with torch.no_grad():
                ck.contextual_loss(x, y, BANDWIDTH, center=center, backend=impl)
        return step

    grad = torch.rand(B, generator=gen).to(device, dtype)
    x.requires_grad_(True)

    def step():
        x.grad = None
        ck.contextual_loss(x, y, BANDWIDTH, center=center, backend=impl).backward(grad)
    return step


if __name__ == "__main__":  # the suite restricted to this op: python -m benchmarks.run --ops contextual_loss
    from benchmarks import run

    run.main(["--ops", "contextual_loss", *__import__("sys").argv[1:]])
