"""CoCosNet networks, options and the full model step (tiny sizes: 64px, ngf/ndf 8, random VGG)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cocos_kernels as ck
from cocos_kernels.testing import assert_close, softmax_floor
from cocosnet.models import MultiscaleDiscriminator, NoVGGCorrespondence, Pix2PixModel, SPADEGenerator, VGG19Features, set_backend
from cocosnet.models.blocks import Attention, pono, spectral_norm
from cocosnet.models.vgg import CONV_INDEX, MISSING_WEIGHTS, build_vgg
from cocosnet.options import RECIPES, build_parser, parse

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--ngf", "8", "--ndf", "8", "--vgg_random_init"]


def tiny_opt(*extra, recipe="ade20k", label_nc="5", mode="train"):
    return parse(["--recipe", recipe, "--label_nc", label_nc, *TINY, *extra], mode=mode)


def batch(opt, B=2, H=64, W=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if opt.dataset_mode in ("celebahqedge", "deepfashion"):
        label = lambda: torch.rand(B, opt.semantic_nc, H, W, generator=g, dtype=dtype)  # noqa: E731
    else:
        label = lambda: torch.randint(0, opt.semantic_nc, (B, 1, H, W), generator=g)  # noqa: E731
    image = lambda: torch.rand(B, 3, H, W, generator=g, dtype=dtype) * 2 - 1  # noqa: E731
    return dict(label=label(), label_ref=label(), image=image(), ref=image(),
                self_ref=torch.tensor([1.0] + [0.0] * (B - 1), dtype=dtype))


# ---------------------------------------------------------------------------------------- options
def test_options_recipes_and_overrides():
    opt = parse(["--recipe", "ade20k"], mode="train")
    assert (opt.label_nc, opt.semantic_nc, opt.load_size, opt.crop_size) == (150, 151, 286, 256)
    assert opt.maskmix and opt.PONO and opt.PONO_C and opt.use_attention and opt.vgg_normal_correct
    assert (opt.warp_mask_losstype, opt.weight_mask, opt.warp_cycle_w, opt.match_kernel) == ("direct", 100.0, 0.0, 3)
    assert (opt.lr, opt.beta1, opt.niter, opt.niter_decay, opt.backend, opt.isTrain) == (0.0002, 0.5, 100, 100, "auto", True)
    opt = parse(["--recipe", "celebahq", "--warp_cycle_w", "0.5", "--crop_size", "512"], mode="train")
    assert (opt.warp_cycle_w, opt.which_perceptual, opt.weight_perceptual, opt.crop_size, opt.semantic_nc) == (0.5, "4_2", 0.001, 512, 19)
    opt = parse(["--recipe", "deepfashion"], mode="test")
    assert opt.warp_patch and opt.no_flip and opt.serial_batches and not opt.isTrain and opt.load_size == 256
    opt = parse(["--dataset_mode", "celebahqedge"], mode="test")
    assert (opt.label_nc, opt.maskmix) == (15, False)
    opt = parse(["--recipe", "ade20k", "--unset", "PONO", "maskmix"], mode="train")
    assert not opt.PONO and not opt.maskmix and opt.PONO_C and opt.use_attention
    assert not parse(["--recipe", "deepfashion", "--unset", "no_flip"], mode="train").no_flip
    with pytest.raises(ValueError, match="--unset crop_size: not an on/off flag"):
        parse(["--unset", "crop_size"], mode="train")
    assert set(RECIPES) == {"ade20k", "celebahq", "celebahqedge", "deepfashion"}


@pytest.mark.parametrize("mode", ["train", "test"])
def test_every_option_has_help(mode):
    for action in build_parser(mode)._actions:
        assert action.help, f"{action.option_strings} has no help text"


@pytest.mark.parametrize("args,match", [
    (["--crop_size", "100"], "crop_size must be a multiple of 32"),
    (["--match_kernel", "2"], "match_kernel must be an odd"),
    (["--dataset_mode", "deepfashion", "--warp_mask_losstype", "direct"], "needs a class-id label map"),
])
def test_option_errors(args, match):
    with pytest.raises(ValueError, match=match):
        parse(args, mode="train")


# ---------------------------------------------------------------------------------------- blocks
def test_pono_uses_unbiased_variance():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=True) + 1e-5)
    torch.testing.assert_close(pono(x), expected)


def unscaled_attention(attn, x):
    """The reference's attention written out (no 1/sqrt(d), no centring), and its largest |logit|."""
    theta = attn.theta(x).flatten(2)
    phi = F.max_pool2d(attn.phi(x), 2).flatten(2)
    g = F.max_pool2d(attn.g(x), 2).flatten(2)
    logits = theta.transpose(1, 2) @ phi
    attended = (g @ torch.softmax(logits, -1).transpose(1, 2)).view(x.shape[0], -1, *x.shape[2:])
    return attn.gamma * attn.o(attended) + x, logits.abs().max().item()


@pytest.mark.backends("correspondence_warp", [torch.float32, torch.float64])
def test_attention_is_unscaled_softmax_attention(backend, dtype, device):
    torch.manual_seed(0)
    attn = Attention(32, use_sn=True, backend=backend).double()
    with torch.no_grad():
        attn.gamma.fill_(0.7)
        for conv in (attn.theta, attn.phi, attn.g, attn.o):  # fresh u, v underestimate sigma: iterate, as training does
            for _ in range(10):
                conv(torch.zeros(1, conv.in_channels, 1, 1, dtype=torch.float64))
    attn.eval()
    x64 = torch.randn(2, 32, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        expected, max_logit = unscaled_attention(attn.to(device), x64.to(device))
    attn = attn.to(dtype)
    x = x64.to(device, dtype).requires_grad_()
    out = attn(x)
    same = None if dtype == torch.float64 else unscaled_attention(attn, x)[0]
    assert_close(out, expected, same, name="out", floor=softmax_floor(dtype, max_logit))
    out.square().sum().backward()
    assert attn.gamma.grad is not None and x.grad.abs().sum() > 0


def reference_power_iteration(matrix, u, v):
    """The reference's update (torch.nn.utils.spectral_norm), written out: v from u first, then u from v."""
    v = matrix.t() @ u
    v = v / v.norm().clamp_min(1e-12)
    u = matrix @ v
    return u / u.norm().clamp_min(1e-12), v


def test_spectral_norm_follows_the_reference_power_iteration():
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(4, 6, 3)).double()
    assert list(conv.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]  # the reference's keys
    matrix = conv.weight_orig.detach().reshape(6, -1)
    u, v = conv.weight_u.clone(), conv.weight_v.clone()
    u_first, v_first = u, v  # torch.nn.utils.parametrizations' order, u from v first, for the same three calls
    for _ in range(3):
        u_first = F.normalize(matrix @ v_first, dim=0)
        v_first = F.normalize(matrix.t() @ u_first, dim=0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(3):
        u, v = reference_power_iteration(matrix, u, v)
        weight = conv.weight_orig.detach().requires_grad_()
        expected = F.conv2d(x, weight / (u @ weight.reshape(6, -1) @ v), conv.bias)
        out = conv(x)
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(conv.weight_u, u, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(conv.weight_v, v, rtol=1e-13, atol=1e-14)
        expected.square().sum().backward()
        out.square().sum().backward()
        torch.testing.assert_close(conv.weight_orig.grad, weight.grad, rtol=1e-12, atol=1e-13)  # u, v constants
        conv.weight_orig.grad = None
    assert (conv.weight_u - u_first).abs().max() > 1e-3  # the other order ends elsewhere
    copy.deepcopy(conv)  # between calls the module holds no graph
    conv.eval()
    torch.testing.assert_close(conv(x), expected.detach(), rtol=1e-13, atol=1e-13)  # eval: the stored u, v
    torch.testing.assert_close(conv.weight_u, u, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- networks
def test_generator_shapes_and_gradients():
    opt = tiny_opt()
    G = SPADEGenerator(opt)
    seg = torch.randn(1, 3 + opt.semantic_nc, 64, 96, requires_grad=True)
    out = G(seg)
    assert out.shape == (1, 3, 64, 96) and out.abs().max() <= 1
    out.sum().backward()
    assert seg.grad.abs().sum() > 0
    assert all(p.grad is not None for p in G.parameters())
    with pytest.raises(ValueError, match="multiple of 32"):
        G(torch.randn(1, 3 + opt.semantic_nc, 80, 64))


@pytest.mark.parametrize("extra,H,W", [
    ([], 64, 64),
    (["--warp_cycle_w", "1", "--warp_bilinear", "--use_coordconv"], 32, 48),
    (["--warp_patch", "--warp_cycle_w", "1"], 48, 32),  # folded at the actual size, not 256
    (["--warp_stride", "2", "--match_kernel", "1", "--warp_mask_losstype", "cycle", "--noise_for_mask"], 32, 32),
])
def test_correspondence_shapes_and_gradients(extra, H, W):
    opt = tiny_opt(*extra)
    corr = NoVGGCorrespondence(opt)
    S, d = opt.semantic_nc, opt.down
    ref = torch.rand(2, 3, H, W, requires_grad=True)
    seg, ref_seg = (F.one_hot(torch.randint(0, S, (2, H, W)), S).permute(0, 3, 1, 2).float() for _ in range(2))
    out = corr(ref, torch.rand(2, 3, H, W), seg, ref_seg)
    assert out["warp_out"].shape == (2, 3, H, W)
    assert out["warp_mask"].shape == (2, S, H // d, W // d)
    torch.testing.assert_close(out["warp_mask"].sum(1), torch.ones(2, H // d, W // d))  # rows of a softmax
    if opt.warp_cycle_w > 0:
        assert out["warp_cycle"].shape == ((2, 3, H, W) if opt.warp_patch else (2, 3, H // d, W // d))
    loss = out["warp_out"].sum() + out["warp_mask"].square().sum() + out["loss_novgg_featpair"]
    loss = loss + (out["warp_cycle"].sum() if "warp_cycle" in out else 0)
    loss.backward()
    assert ref.grad.abs().sum() > 0
    assert all(p.grad is not None for p in corr.parameters())


@pytest.mark.backends("correspondence_warp", [torch.float32])
def test_correspondence_backends_agree(backend, dtype, device):
    torch.manual_seed(0)
    opt = tiny_opt("--warp_cycle_w", "1", "--backend", "reference")
    corr = NoVGGCorrespondence(opt).eval().to(device)
    fused = copy.deepcopy(corr)
    set_backend(fused, backend)
    S = opt.semantic_nc
    ref, real = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    seg, ref_seg = (F.one_hot(torch.randint(0, S, (1, 32, 32)), S).permute(0, 3, 1, 2).float() for _ in range(2))
    inputs = [t.to(device, dtype) for t in (ref, real, seg, ref_seg)]
    with torch.no_grad():
        exact = copy.deepcopy(corr).double()(*(t.double() for t in inputs))
        same, out = corr(*inputs), fused(*inputs)
    assert sorted(out) == ["loss_novgg_featpair", "warp_cycle", "warp_mask", "warp_out"]
    for k in exact:
        assert_close(out[k], exact[k], same[k], name=k)


def test_warp_patch_of_a_uniform_exemplar_is_that_exemplar():
    # Every 4x4 patch is the same, so any softmax mix of patches gives the exemplar back.
    opt = tiny_opt("--warp_patch")
    corr = NoVGGCorrespondence(opt).eval()
    ref = torch.full((1, 3, 48, 32), 0.3)
    seg = torch.zeros(1, opt.semantic_nc, 48, 32)
    seg[:, 1] = 1
    out = corr(ref, None, seg, seg)
    torch.testing.assert_close(out["warp_out"], ref)


def test_discriminator_shapes():
    opt = tiny_opt()
    D = MultiscaleDiscriminator(opt)
    x = torch.randn(2, opt.semantic_nc + 3, 64, 64, requires_grad=True)
    out = D(x)
    assert [[tuple(t.shape[1:]) for t in scale] for scale in out] == [
        [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 7, 7), (1, 6, 6)],
        [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 3, 3), (1, 2, 2)],
    ]
    sum(t.sum() for scale in out for t in scale).backward()
    assert all(p.grad is not None for p in D.parameters())


def test_vgg_layout_conventions_and_missing_weights(tmp_path):
    vgg = VGG19Features("caffe")
    assert [k for k in vgg.state_dict() if k.endswith("weight")][:3] == ["features.0.weight", "features.2.weight", "features.5.weight"]
    assert CONV_INDEX["conv5_4"] == 34  # torchvision vgg19().features index of the last conv
    caffe = {f"{name}.{p}": t for name, i in CONV_INDEX.items() for p, t in
             (("weight", torch.randn_like(vgg.features[i].weight)), ("bias", torch.randn_like(vgg.features[i].bias)))}
    path = tmp_path / "vgg19_conv.pth"
    torch.save(caffe, path)
    opt = tiny_opt("--vgg_path", str(path))
    opt.vgg_random_init = False
    net = build_vgg(opt)
    assert net.convention == "caffe" and torch.equal(net.features[34].bias, caffe["conv5_4.bias"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    bgr255 = (torch.stack([x[:, 2], x[:, 1], x[:, 0]], 1) + 1) / 2 * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    torch.testing.assert_close(net.preprocess(x), bgr255, atol=1e-3, rtol=0)
    tv = {f"features.{i}.{p}": v for name, i in CONV_INDEX.items() for p, v in
          (("weight", caffe[f"{name}.weight"]), ("bias", caffe[f"{name}.bias"]))}
    tv["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(tv, path)
    net = build_vgg(opt)
    assert net.convention == "torchvision" and torch.equal(net.features[34].bias, caffe["conv5_4.bias"])
    feats = net(x)
    assert [f.shape[1:] for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    opt.vgg_path = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError) as e:
        build_vgg(opt)
    assert str(e.value) == MISSING_WEIGHTS.format(path=opt.vgg_path)
    assert "vgg19_conv.pth" in str(e.value) and "--vgg_path" in str(e.value)


# ---------------------------------------------------------------------------------------- the model
EVERY_LOSS = ["--warp_cycle_w", "0.1", "--warp_self_w", "100"]  # ade20k + these: all nine G terms
SMALL_D = ["--num_D", "1"]  # cheaper: the multi-scale D has its own test


def test_full_training_step_runs_every_loss_and_updates_every_group():
    torch.manual_seed(0)
    opt = tiny_opt(*EVERY_LOSS, "--backend", "reference")
    model = Pix2PixModel(opt)
    opt_G, opt_D = model.create_optimizers(opt)
    assert [g["lr"] for g in opt_G.param_groups] == [1e-4, 1e-4] and opt_G.defaults["eps"] == 1e-3
    assert opt_G.defaults["betas"] == (0, 0.9) and opt_D.defaults["lr"] == 4e-4 and opt_D.defaults["eps"] == 1e-8
    data = batch(opt)
    before = {k: v.detach().clone() for k, v in model.net.named_parameters()}

    g_losses, generated = model(data, "generator")
    assert sorted(g_losses) == sorted(["no_vgg_feat", "G_warp_cycle", "G_warp_self", "GAN", "GAN_Feat", "fm", "perc",
                                       "contextual", "mask"])
    assert all(torch.isfinite(v).all() for v in g_losses.values())
    opt_G.zero_grad()
    sum(g_losses.values()).backward()
    _check_gradients(model.net["netG"], "netG")
    _check_gradients(model.net["netCorr"], "netCorr")
    opt_G.step()

    d_losses = model(data, "discriminator", GforD=generated)
    assert sorted(d_losses) == ["D_Fake", "D_real"]
    opt_D.zero_grad()
    sum(d_losses.values()).backward()
    _check_gradients(model.net["netD"], "netD")
    opt_D.step()
    assert all(p.grad is None for p in model.vggnet_fix.parameters())
    after = dict(model.net.named_parameters())
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert len(changed) == len([n for n, p in after.items() if p.grad.abs().sum() > 0])

    out = model(data, "inference")
    assert out["fake_image"].shape == (2, 3, 64, 64) and out["warp_out"].shape == (2, 3, 64, 64)
    assert out["warp_mask"].shape == (2, opt.semantic_nc, 16, 16)


def _check_gradients(net, name):
    """Every parameter has a gradient, nonzero except the attention convs: gamma starts at 0, as in the reference."""
    assert all(p.grad is not None for p in net.parameters()), name
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    # D's last bias: the hinge terms' bias gradients -mean[D(real) < 1] + mean[D(fake) > -1] cancel while every
    # output lies in (-1, 1), as at initialisation.
    allowed = [n for n in zero if ("attn." in n and not n.endswith("gamma")) or (name == "netD" and n.endswith("model4.0.bias"))]
    assert zero == allowed, f"{name}: no gradient for {sorted(set(zero) - set(allowed))}"


def _losses_and_grads(model, data):
    g_losses, generated = model(data, "generator")
    params = [p for p in model.net.parameters()]
    total = sum(g_losses.values())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    d_losses = model(data, "discriminator", GforD=generated)
    d_grads = torch.autograd.grad(sum(d_losses.values()), list(model.net["netD"].parameters()))
    return {**g_losses, **d_losses}, grads, d_grads


def test_fused_backend_matches_reference_in_float64():
    ck.select("cpu", torch.device("cpu"), torch.float64)  # raises with the reason if the CPU kernels cannot run
    torch.manual_seed(0)
    opt = tiny_opt(*EVERY_LOSS, *SMALL_D, "--backend", "reference")
    reference = Pix2PixModel(opt).double().eval()  # eval: spectral norm's u, v stay fixed between the two runs
    fused = copy.deepcopy(reference)
    fused.set_backend("cpu")
    assert fused.net["netG"].attn.backend == "cpu" and fused.opt.backend == "cpu" and reference.opt.backend == "reference"
    data = batch(opt, B=1, dtype=torch.float64)
    ref_losses, ref_grads, ref_d = _losses_and_grads(reference, data)
    losses, grads, d_grads = _losses_and_grads(fused, data)
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-9, atol=1e-9, msg=k)
    names = [n for n, _ in reference.net.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            scale = max(1.0, b.abs().max().item())
            assert (a - b).abs().max().item() <= 1e-7 * scale, name
    for a, b in zip(d_grads, ref_d):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("pono", [True, False], ids=["pono", "batchnorm"])
def test_activation_checkpointing_changes_nothing_but_memory(pono):
    """--activation_checkpointing recomputes blocks in the backward: the same losses, gradients, and
    state after the step (BatchNorm running statistics, spectral norm's u and v advance once)."""
    torch.manual_seed(0)
    # Without PONO the SPADE layers hold BatchNorms; the HW x HW ops sit outside the blocks.
    opt = tiny_opt(*EVERY_LOSS, *SMALL_D, "--backend", "reference", *([] if pono else ["--unset", "PONO"]))
    assert opt.PONO == pono
    plain = Pix2PixModel(opt).double()
    recomputing = copy.deepcopy(plain)
    switched = [m for m in recomputing.modules() if hasattr(m, "recompute")]
    assert len(switched) > 20
    for m in switched:
        m.recompute = True
    data = batch(opt, B=1, dtype=torch.float64)
    results = [_losses_and_grads(model, data) for model in (plain, recomputing)]
    (losses, grads, d_grads), (r_losses, r_grads, r_d_grads) = results
    assert losses.keys() == r_losses.keys()
    for k in losses:
        torch.testing.assert_close(r_losses[k], losses[k], rtol=1e-12, atol=1e-12, msg=k)
    for a, b in zip([*grads, *d_grads], [*r_grads, *r_d_grads]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    state, r_state = plain.state_dict(), recomputing.state_dict()
    advanced = [k for k in state if k.endswith(("running_mean", "_u", "num_batches_tracked"))]
    assert advanced and (pono or any(k.endswith("running_mean") for k in advanced))
    for k in state:
        torch.testing.assert_close(r_state[k], state[k], rtol=0, atol=0, msg=k)


def _run_reference_spectral_norm(model):
    """Each spectral-normed conv of `model` runs `reference_power_iteration` instead of ours; returns their count."""
    def hook(conv, args):
        matrix = conv.weight_orig.reshape(len(conv.weight_u), -1)
        if conv.training:
            with torch.no_grad():
                u, v = reference_power_iteration(matrix, conv.weight_u, conv.weight_v)
                conv.weight_u.copy_(u)
                conv.weight_v.copy_(v)
        conv.weight = conv.weight_orig / (conv.weight_u.clone() @ matrix @ conv.weight_v.clone())
    convs = [m for m in model.modules() if hasattr(m, "weight_u")]
    for conv in convs:
        conv._forward_pre_hooks.clear()
        conv._forward_hooks.clear()
        conv.register_forward_pre_hook(hook)
    return len(convs)


def test_training_step_spectral_norm_is_the_references():
    """One generator step and the next forward in float64: the same u, v, losses, warp and output as the
    model whose spectral norms run the written-out reference update."""
    torch.manual_seed(0)
    opt = tiny_opt(*SMALL_D, "--backend", "reference")
    ours = Pix2PixModel(opt).double()
    reference = copy.deepcopy(ours)
    assert _run_reference_spectral_norm(reference) > 40
    data = batch(opt, B=1, dtype=torch.float64)
    results = []
    for model in (ours, reference):
        optimizer, _ = model.create_optimizers(opt)
        losses, _ = model(data, "generator")
        sum(losses.values()).backward()
        optimizer.step()
        results.append((losses, model(data, "generator")[1], model.state_dict()))
    (losses, out, state), (r_losses, r_out, r_state) = results
    for k in r_losses:
        torch.testing.assert_close(losses[k], r_losses[k], rtol=1e-11, atol=1e-12, msg=k)
    for k in ("warp_out", "fake_image"):
        torch.testing.assert_close(out[k], r_out[k], rtol=1e-10, atol=1e-11, msg=k)
    assert state.keys() == r_state.keys()
    for k in state:
        torch.testing.assert_close(state[k], r_state[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("recipe", ["celebahq", "celebahqedge", "deepfashion"])
def test_recipes_step(recipe):
    opt = tiny_opt(*SMALL_D, recipe=recipe, label_nc="4")
    model = Pix2PixModel(opt)
    data = batch(opt, B=1)
    if recipe == "celebahq":  # (class id, glasses) channels, as the reference's CelebA-HQ dataset returns
        data["label"] = torch.cat([data["label"], torch.ones_like(data["label"])], 1)
        data["label_ref"] = torch.cat([data["label_ref"], torch.zeros_like(data["label_ref"])], 1)
    g_losses, generated = model(data, "generator")
    assert all(torch.isfinite(v).all() for v in g_losses.values())
    assert ("G_warp_cycle" in g_losses) == (recipe != "deepfashion") and ("G_warp_self" in g_losses) == (recipe == "deepfashion")
    assert ("mask" in g_losses) == (recipe == "celebahq")
    if recipe == "celebahq":
        assert torch.equal(generated["input_semantics"][:, -3], torch.ones(1, 64, 64))
    sum(g_losses.values()).backward()
    out = model(data, "inference")
    assert out["fake_image"].shape == (1, 3, 64, 64)


def test_bad_data_raises():
    opt = tiny_opt()
    model = Pix2PixModel(opt)
    data = batch(opt, B=1)
    data["label"] = data["label"] + opt.semantic_nc
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 5\]"):
        model(data, "inference")
    with pytest.raises(ValueError, match="mode must be one of"):
        model(batch(opt, B=1), "train")
    del data["ref"]
    with pytest.raises(ValueError, match="data has no 'ref'"):
        model(data, "generator")


def test_bfloat16_autocast_step():
    # The correspondence runs in float32 (features promoted to the exemplar's dtype), the rest in bfloat16.
    torch.manual_seed(0)
    opt = tiny_opt(*EVERY_LOSS, *SMALL_D, "--backend", "cpu")
    model = Pix2PixModel(opt)
    data = batch(opt, B=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_losses, generated = model(data, "generator")
    assert generated["fake_image"].dtype == torch.bfloat16 and generated["warp_mask"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in g_losses.values())
    sum(g_losses.values()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_losses = model(data, "discriminator", GforD=generated)
    sum(d_losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.net.parameters())
