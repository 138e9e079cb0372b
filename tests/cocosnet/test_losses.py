"""CoCosNet's loss terms against the reference's formulas, written out here (float64, small tensors)."""
import pytest
import torch
import torch.nn.functional as F

from cocosnet import losses as L


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hinge_gan_loss_averages_scales():
    g = torch.Generator().manual_seed(0)
    preds = [[torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 1, 3, 3, generator=g) * 2] for _ in range(2)]
    gan = L.GANLoss("hinge")
    last = [p[-1] for p in preds]
    assert torch.allclose(gan(preds, True, for_discriminator=False), -(last[0].mean() + last[1].mean()) / 2)
    d_real = sum(torch.clamp(1 - x, min=0).mean() for x in last) / 2
    d_fake = sum(torch.clamp(1 + x, min=0).mean() for x in last) / 2
    assert torch.allclose(gan(preds, True), d_real) and torch.allclose(gan(preds, False), d_fake)
    with pytest.raises(ValueError, match="gan_mode"):
        L.GANLoss("wasserstein")


def test_gan_feature_matching_skips_the_prediction():
    fake = [[torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 1, 1)]]
    real = [[torch.ones(1, 2, 3, 3), torch.full((1, 1, 2, 2), 5.0)], [torch.full((1, 2, 2, 2), 2.0), torch.zeros(1, 1, 1, 1)]]
    assert torch.allclose(L.gan_feature_matching(fake, real, 10.0), torch.tensor((1.0 + 2.0) * 10 / 2))


def test_pair_weights_and_batch_scaling():
    w = L.pair_weights(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(w.flatten(), torch.tensor([1, 0, 1, 0]) / (2 + 1e-5))
    w3 = L.pair_weights(torch.ones(2, 3, 4, 4))  # the reference's self_ref is shaped like the image
    torch.testing.assert_close(w3.flatten(), torch.full((2,), 1 / (2 + 1e-5)))
    assert L.pair_weights(torch.zeros(3)).abs().sum() == 0  # no pseudo pair: fm and warp_self vanish
    x, y = torch.ones(4, 3, 2, 2), torch.zeros(4, 3, 2, 2)
    # mean over B*C*H*W of w_b |x - y|: 1 / B of the per-pair L1, as the reference (pitfall: batch-size dependent)
    torch.testing.assert_close(L.weighted_l1(x, y, w), torch.tensor(2 / (2 + 1e-5) / 4))


def test_feature_matching_layer_weights():
    fake = [torch.full((1, 1, 2, 2), float(i + 1)) for i in range(5)]
    real = [torch.zeros(1, 1, 2, 2) for _ in range(5)]
    w = L.pair_weights(torch.ones(1))
    expected = sum(lw * (i + 1) for i, lw in enumerate((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1))) / (1 + 1e-5)
    torch.testing.assert_close(L.feature_matching(fake, real, w), torch.tensor(expected))


def _cx_materialised(x, y, pono):
    """The reference's ContextualLoss_forward, written out: centre with y's stats, normalise, row max of A."""
    mean = y.mean(dim=1, keepdim=True) if pono else y.mean(dim=(2, 3), keepdim=True)
    xs, ys = (x - mean).flatten(2), (y - mean).flatten(2)
    xs = xs / (xs.norm(dim=1, keepdim=True) + 2.220446049250313e-16)
    ys = ys / (ys.norm(dim=1, keepdim=True) + 2.220446049250313e-16)
    d = 1 - xs.transpose(1, 2) @ ys
    d = d / (d.min(dim=-1, keepdim=True)[0] + 1e-3)
    A = torch.softmax((1 - d) / 0.1, dim=-1)
    return (-torch.log(A.max(dim=-1)[0].mean(dim=-1))).mean()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("pono", [True, False])
def test_contextual_layers(backend, pono):
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4, 16, 16), (2, 6, 8, 8), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    fake = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    ref = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    loss = L.contextual_layers(fake, ref, pono, backend, use_22ctx=True)
    expected = (8 * _cx_materialised(fake[4], ref[4], pono) + 4 * _cx_materialised(fake[3], ref[3], pono)
                + 2 * _cx_materialised(F.avg_pool2d(fake[2], 2), F.avg_pool2d(ref[2], 2), pono)
                + _cx_materialised(F.avg_pool2d(fake[1], 4), F.avg_pool2d(ref[1], 4), pono))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, fake[1:])
    expected_grads = torch.autograd.grad(expected, fake[1:])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _mask_loss_reference_loop(warp_mask, label, ref_label):
    """The reference's per-sample loop with torch.unique (models/pix2pix_model.py)."""
    ref = F.interpolate(ref_label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    gt = F.interpolate(label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    weights = []
    for i in range(ref.shape[0]):
        absent = [c for c in torch.unique(gt[i]) if c not in torch.unique(ref[i])]
        w = torch.ones_like(gt[i]).double()
        for c in absent:
            w[gt[i] == c] = 0
        w[gt[i] == 0] = 0
        weights.append(w)
    w = torch.stack(weights)
    return (F.nll_loss(torch.log(warp_mask + 1e-10), gt, reduction="none") * w).sum() / (w.sum() + 1e-5)


def test_warped_mask_loss_matches_the_reference_loop():
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 6, (2, 1, 32, 32), generator=g)
    ref_label = torch.randint(2, 5, (2, 1, 32, 32), generator=g)  # classes 0, 1 and 5 absent from the exemplar
    warp_mask = torch.softmax(torch.randn(2, 6, 8, 8, generator=g, dtype=torch.float64), 1)
    loss = L.warped_mask(warp_mask, label, ref_label)
    torch.testing.assert_close(loss, _mask_loss_reference_loop(warp_mask, label, ref_label))
    assert L.warped_mask(warp_mask, torch.zeros_like(label), ref_label) == 0  # class 0 carries no loss
    with pytest.raises(ValueError, match="--warp_stride 4"):
        L.warped_mask(torch.softmax(torch.randn(2, 6, 16, 16), 1), label, ref_label)


def test_perceptual_is_mse_with_detached_target():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = L.perceptual(x, y)
    torch.testing.assert_close(loss, F.mse_loss(x, y))
    loss.backward()
    assert y.grad is None and x.grad is not None
