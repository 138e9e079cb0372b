"""Building blocks shared by the correspondence network, the generator and the discriminator.

Module and parameter names follow the reference (models/networks/{normalization,architecture}.py)
so that its checkpoints load through `cocosnet.convert`; spectral norm keeps the reference's state
and keys (`<conv>.weight_orig`, `.weight_u`, `.weight_v`) and its power iteration (`spectral_norm`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import cocos_kernels as ck

PONO_EPS = 1e-5  # the reference's PositionalNorm2d epsilon (v2 uses 1e-8)
SN_EPS = 1e-12  # spectral norm's floor on the norms of u and v (torch.nn.utils.spectral_norm's default)


def pono(x: torch.Tensor, eps: float = PONO_EPS) -> torch.Tensor:
    """Positional normalisation: per position over channels, with the *unbiased* variance (as the reference)."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.var(dim=1, keepdim=True, unbiased=True).add(eps).sqrt()
    return (x - mean) / std


def spectral_norm(conv: nn.Conv2d) -> nn.Conv2d:
    """The reference's spectral norm (`torch.nn.utils.spectral_norm`, one power iteration per call) on `conv`.

    State and keys as in the reference's checkpoints: the parameter `weight_orig`, the buffers
    `weight_u` (out_channels) and `weight_v` (the rest of the weight's entries), drawn as the reference
    draws them (normalised N(0, 1), no warm-up iterations). Before each call `conv.weight` becomes
    weight_orig / sigma with sigma = u^T W v (W: weight_orig as an out_channels-row matrix; u, v constants
    for autograd); in training u and v first advance in place, v = normalize(W^T u) then u = normalize(W v).
    That order is the reference's: `torch.nn.utils.parametrizations.spectral_norm` updates u first and
    ends half an iteration behind. Between calls `conv.weight` holds the last weight, detached (so the
    module deep-copies).
    """
    weight = conv.weight
    del conv.weight
    conv.register_parameter("weight_orig", weight)
    with torch.no_grad():
        conv.register_buffer("weight_u", F.normalize(weight.new_empty(weight.shape[0]).normal_(), dim=0, eps=SN_EPS))
        conv.register_buffer("weight_v", F.normalize(weight.new_empty(weight[0].numel()).normal_(), dim=0, eps=SN_EPS))
        conv.weight = _normalized_weight(conv, power_iteration=False)
    conv.register_forward_pre_hook(_set_weight)
    conv.register_forward_hook(_detach_weight)
    return conv


def _normalized_weight(conv: nn.Conv2d, power_iteration: bool) -> torch.Tensor:
    matrix = conv.weight_orig.reshape(conv.weight_orig.shape[0], -1)
    u, v = conv.weight_u, conv.weight_v
    if power_iteration:
        with torch.no_grad():
            v.copy_(F.normalize(torch.mv(matrix.t(), u), dim=0, eps=SN_EPS))
            u.copy_(F.normalize(torch.mv(matrix, v), dim=0, eps=SN_EPS))
        u, v = u.clone(), v.clone()  # autograd keeps these; the next call updates the buffers in place
    return conv.weight_orig / torch.dot(u, torch.mv(matrix, v))


def _set_weight(conv: nn.Conv2d, args) -> None:
    conv.weight = _normalized_weight(conv, power_iteration=conv.training)


def _detach_weight(conv: nn.Conv2d, args, output) -> None:
    conv.weight = conv.weight.detach()


def _spectral_norms(module: nn.Module) -> list:
    return [m for m in module.modules() if hasattr(m, "weight_u") and m.training]


@contextmanager
def _recording(module: nn.Module, start: list):
    """Around the forward: the spectral norms' u, v before their power iteration."""
    start.extend((m.weight_u.clone(), m.weight_v.clone()) for m in _spectral_norms(module))
    yield


@contextmanager
def _replaying(module: nn.Module, start: list):
    """Around the recomputation in the backward: the same weights, and no state advanced twice.

    Spectral norm's power iteration restarts from the u, v the forward started from (the module
    may have run again since, as the adaptor does for the exemplar and the ground truth), and the
    u, v of now are put back afterwards; BatchNorm normalises by the batch as before, while
    momentum 0 keeps its running statistics (and its step counter is put back)."""
    sns = _spectral_norms(module)
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    now = [(m.weight_u.clone(), m.weight_v.clone()) for m in sns]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    with torch.no_grad():
        for m, (u, v) in zip(sns, start):
            m.weight_u.copy_(u)
            m.weight_v.copy_(v)
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (u, v) in zip(sns, now):
                m.weight_u.copy_(u)
                m.weight_v.copy_(v)
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def recomputed(module: nn.Module, forward, *args):
    """forward(*args), where module.recompute is set (--activation_checkpointing) and gradients are
    recorded: its activations are recomputed in the backward instead of kept (torch.utils.checkpoint)."""
    if not (getattr(module, "recompute", False) and module.training and torch.is_grad_enabled()):
        return forward(*args)

    def contexts():
        start = []
        return _recording(module, start), _replaying(module, start)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)


def conv_norm(conv: nn.Conv2d, norm_type: str) -> nn.Module:
    """The reference's get_nonspade_norm_layer: [spectral]<norm> -> conv or Sequential(conv, norm).

    With a norm after it the conv loses its bias (it would be cancelled), as in the reference.
    """
    if norm_type.startswith("spectral"):
        conv = spectral_norm(conv)
        norm_type = norm_type[len("spectral"):]
    if norm_type in ("", "none"):
        return conv
    if conv.bias is not None:
        del conv.bias
        conv.register_parameter("bias", None)
    if norm_type == "instance":
        norm = nn.InstanceNorm2d(conv.out_channels, affine=False)
    elif norm_type == "batch":
        norm = nn.BatchNorm2d(conv.out_channels, affine=True)
    else:
        raise ValueError(f"norm type {norm_type!r} is not supported: use [spectral](instance|batch|none)")
    return nn.Sequential(conv, norm)


class SPADE(nn.Module):
    """out = norm(x) * (1 + gamma(c)) + beta(c), gamma/beta from the conditioning map c resized to x (nearest)."""

    def __init__(self, config_text: str, norm_nc: int, label_nc: int, PONO: bool = False, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        parsed = re.fullmatch(r"spade(\D+)(\d)x\d", config_text)
        if parsed is None:
            raise ValueError(f"SPADE config {config_text!r} must look like spade<norm><k>x<k>, e.g. spadesyncbatch3x3")
        norm_type, ks = parsed.group(1), int(parsed.group(2))
        self.PONO = PONO
        if PONO:
            self.param_free_norm = None
        elif norm_type == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        elif norm_type in ("syncbatch", "batch"):
            # A (sync) BatchNorm: the training loop converts it with SyncBatchNorm.convert_sync_batchnorm under DDP.
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        else:
            raise ValueError(f"SPADE param-free norm {norm_type!r} is not supported: use instance, batch or syncbatch")
        nhidden = 128  # hard-coded in the reference
        pw = ks // 2
        # Index 0 of mlp_shared is the pad: the reference's keys are mlp_shared.1.*.
        self.mlp_shared = nn.Sequential(nn.ReflectionPad2d(pw), nn.Conv2d(label_nc, nhidden, ks), nn.ReLU())
        self.pad = nn.ReflectionPad2d(pw)
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, ks)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, ks)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        return recomputed(self, self._forward, x, segmap)

    def _forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = pono(x) if self.PONO else self.param_free_norm(x)
        if segmap.shape[2:] != x.shape[2:]:  # nearest to the same size is the identity: no copy
            segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.pad(self.mlp_shared(segmap))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """SPADE -> lrelu -> reflect-pad conv -> SPADE -> lrelu -> reflect-pad conv, plus a (learned) shortcut."""

    def __init__(self, fin: int, fout: int, opt, ic: int):
        super().__init__()
        self.recompute = getattr(opt, "activation_checkpointing", False)
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.pad = nn.ReflectionPad2d(1)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        if "spectral" in opt.norm_G:
            self.conv_0 = spectral_norm(self.conv_0)
            self.conv_1 = spectral_norm(self.conv_1)
            if self.learned_shortcut:
                self.conv_s = spectral_norm(self.conv_s)
        config = opt.norm_G.replace("spectral", "")
        # Nested: recomputing the block in the backward keeps just one SPADE's activations at a time.
        self.norm_0 = SPADE(config, fin, ic, PONO=opt.PONO, recompute=self.recompute)
        self.norm_1 = SPADE(config, fmiddle, ic, PONO=opt.PONO, recompute=self.recompute)
        if self.learned_shortcut:
            self.norm_s = SPADE(config, fin, ic, PONO=opt.PONO, recompute=self.recompute)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return recomputed(self, self._forward, x, seg)

    def _forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(self.pad(F.leaky_relu(self.norm_0(x, seg), 0.2)))
        dx = self.conv_1(self.pad(F.leaky_relu(self.norm_1(dx, seg), 0.2)))
        return x_s + dx


class Attention(nn.Module):
    """The reference's self-attention: x + gamma * W_o(V softmax(Q^T K)^T), K and V max-pooled 2x2.

    The logits are unscaled and uncentred (no 1/sqrt(d)). The softmax-weighted sum runs through
    `cocos_kernels.correspondence_warp` in plain attention mode (center=None, normalize=False,
    temperature=1), so the (HW x HW/4) matrix is never materialised on a fused backend.
    """

    def __init__(self, ch: int, use_sn: bool, backend: str = "auto"):
        super().__init__()
        self.ch = ch
        self.backend = backend
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        if use_sn:
            self.theta, self.phi, self.g, self.o = (spectral_norm(m) for m in (self.theta, self.phi, self.g, self.o))
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Attention needs an even spatial size (2x2 max-pooled keys), got {tuple(x.shape[2:])}")
        theta = self.theta(x)
        phi = F.max_pool2d(self.phi(x), 2)
        g = F.max_pool2d(self.g(x), 2)
        attended = ck.correspondence_warp(
            theta, phi, g, temperature=1.0, center=None, normalize=False, patch_size=1, backend=self.backend
        )
        return self.gamma * self.o(attended) + x


def init_weights(net: nn.Module, init_type: str = "xavier", gain: float = 0.02) -> None:
    """The reference's BaseNetwork.init_weights: every Conv/Linear weight from `init_type`, biases 0.

    The reference initialises spectral-normed convs through their `weight_orig` storage, so the
    original (pre-normalisation) weight is what gets initialised here too.
    """
    for m in net.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight_orig if hasattr(m, "weight_orig") else m.weight
        with torch.no_grad():
            if init_type == "normal":
                nn.init.normal_(w, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(w, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(w, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(w, gain=gain)
            else:
                raise ValueError(f"init_type must be normal, xavier, kaiming or orthogonal, got {init_type!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
