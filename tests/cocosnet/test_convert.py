"""Reference checkpoints load strictly through cocosnet.convert.

`reference_state_shapes` writes down, from reading microsoft/CoCosNet (models/networks/
{generator,correspondence,architecture,normalization,discriminator}.py), the parameter and buffer
names and shapes its `<epoch>_net_{G,Corr,D}.pth` files hold -- independently of our modules --
so a renamed or re-shaped layer on our side fails here.
"""
import json
import os

import pytest
import torch

from cocosnet.convert import from_reference, load_reference, main
from cocosnet.convert import build_networks, load_reference_checkpoints
from cocosnet.options import parse


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(keys, prefix, cout, cin, k, bias=True, sn=False):
    if sn:  # old-style torch.nn.utils.spectral_norm: weight_orig parameter, u and v buffers
        keys[f"{prefix}.weight_orig"] = (cout, cin, k, k)
        keys[f"{prefix}.weight_u"] = (cout,)
        keys[f"{prefix}.weight_v"] = (cin * k * k,)
    else:
        keys[f"{prefix}.weight"] = (cout, cin, k, k)
    if bias:
        keys[f"{prefix}.bias"] = (cout,)


def _spade(keys, prefix, norm_nc, label_nc):
    _conv(keys, f"{prefix}.mlp_shared.1", 128, label_nc, 3)  # index 0 is the reflection pad
    _conv(keys, f"{prefix}.mlp_gamma", norm_nc, 128, 3)
    _conv(keys, f"{prefix}.mlp_beta", norm_nc, 128, 3)


def _spade_block(keys, prefix, fin, fout, ic):
    fmid = min(fin, fout)
    _conv(keys, f"{prefix}.conv_0", fmid, fin, 3, sn=True)
    _conv(keys, f"{prefix}.conv_1", fout, fmid, 3, sn=True)
    _spade(keys, f"{prefix}.norm_0", fin, ic)
    _spade(keys, f"{prefix}.norm_1", fmid, ic)
    if fin != fout:
        _conv(keys, f"{prefix}.conv_s", fout, fin, 1, bias=False, sn=True)
        _spade(keys, f"{prefix}.norm_s", fin, ic)


def _attention(keys, prefix, ch):
    for name, cout, cin in (("theta", ch // 8, ch), ("phi", ch // 8, ch), ("g", ch // 2, ch), ("o", ch, ch // 2)):
        _conv(keys, f"{prefix}.{name}", cout, cin, 1, bias=False, sn=True)
    keys[f"{prefix}.gamma"] = ()


def reference_state_shapes(ngf, ndf, S, adaptor_kernel, maskmix=True, n_layers_D=4, num_D=2):
    """{key: shape} of the reference's net_G, net_Corr, net_D state dicts (PONO, spectral norm, attention)."""
    G, Corr, D = {}, {}, {}
    ic = 3 + S  # CBN_intype warp_mask
    _conv(G, "fc", 16 * ngf, ic, 3)
    for name, fin, fout in (("head_0", 16, 16), ("G_middle_0", 16, 16), ("G_middle_1", 16, 16), ("up_0", 16, 8),
                            ("up_1", 8, 4), ("up_2", 4, 2), ("up_3", 2, 1)):
        _spade_block(G, name, fin * ngf, fout * ngf, ic)
    _attention(G, "attn", 4 * ngf)
    _conv(G, "conv_img", 3, ngf, 3)

    for branch, cin in (("adaptive_model_seg", S), ("adaptive_model_img", 3)):
        # get_nonspade_norm_layer(spectralinstance): Sequential(SN conv without bias, InstanceNorm)
        for i, (cout, c_in, k) in enumerate(((ngf, cin, 3), (2 * ngf, ngf, adaptor_kernel), (4 * ngf, 2 * ngf, 3),
                                             (8 * ngf, 4 * ngf, adaptor_kernel), (8 * ngf, 8 * ngf, 3)), start=1):
            _conv(Corr, f"{branch}.layer{i}.0", cout, c_in, k, bias=False, sn=True)
        _spade_block(Corr, f"{branch}.head_0", 8 * ngf, 8 * ngf, cin)
        _spade_block(Corr, f"{branch}.G_middle_0", 8 * ngf, 8 * ngf, cin)
        _spade_block(Corr, f"{branch}.G_middle_1", 8 * ngf, 4 * ngf, cin)
    trunk = 4 * ngf + (S if maskmix else 0)  # the reference hard-codes 4 * 64 here: it only runs with ngf 64
    for i in range(4):
        _conv(Corr, f"layer.{i}.conv1", trunk, trunk, 3)
        _conv(Corr, f"layer.{i}.conv2", trunk, trunk, 3)
        Corr[f"layer.{i}.prelu.weight"] = (1,)
    _conv(Corr, "phi", 256, trunk, 1)
    _conv(Corr, "theta", 256, trunk, 1)

    for d in range(num_D):
        p, nf = f"discriminator_{d}", ndf
        _conv(D, f"{p}.model0.0", nf, S + 3, 4)
        for n in range(1, n_layers_D):
            nf_prev, nf = nf, min(nf * 2, 512)
            if n == n_layers_D - 1:
                _attention(D, f"{p}.attn", nf_prev)
                nc = nf_prev  # the never-called segmentation decoder
                for j in range(n_layers_D - 1):
                    _conv(D, f"{p}.dec.{3 * j + 1}.0", nc // 2, nc, 3, bias=False, sn=True)
                    nc //= 2
                _conv(D, f"{p}.dec.{3 * (n_layers_D - 1)}", S, nc, 3)
            _conv(D, f"{p}.model{n}.0.0", nf, nf_prev, 4, bias=False, sn=True)
        _conv(D, f"{p}.model{n_layers_D}.0", 1, nf, 4)
    return {"G": G, "Corr": Corr, "D": D}


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


RECIPES = [("ade20k", 3, 151), ("celebahq", 4, 19), ("celebahqedge", 4, 15), ("deepfashion", 4, 20)]


@pytest.mark.parametrize("recipe,adaptor_kernel,S", RECIPES, ids=[r[0] for r in RECIPES])
def test_reference_checkpoints_load_strictly(recipe, adaptor_kernel, S):
    opt = parse(["--recipe", recipe, "--ngf", "16", "--ndf", "16"], mode="train")
    assert opt.semantic_nc == S and opt.adaptor_kernel == adaptor_kernel
    nets = build_networks(opt, with_D=True)
    shapes = reference_state_shapes(16, 16, S, adaptor_kernel, maskmix=opt.maskmix)
    for label, key in (("G", "netG"), ("Corr", "netCorr"), ("D", "netD")):
        state = _random_state(shapes[label])
        dropped = load_reference(nets[key], state, label)
        assert all(".dec." in k for k in dropped) and (len(dropped) > 0) == (label == "D")
        ours = nets[key].state_dict()
        converted, _ = from_reference(state)
        for k, v in converted.items():  # the values landed where the names say
            assert torch.equal(ours[k], v), k
        assert set(ours) == {k for k in state if ".dec." not in k}  # the reference's own keys


def test_released_ade20k_size():
    """Full-size ADE20k networks: reference keys load; G + Corr hold 155,979,976 parameters.

    (The OpenVINO model card's 167.9 M for Corr + G is this plus the 11,929,988 parameters of the
    shared trunk counted a second time: the trunk runs on both branches.)
    """
    opt = parse(["--recipe", "ade20k"], mode="train")
    nets = build_networks(opt, with_D=False)
    shapes = reference_state_shapes(64, 64, 151, 3)
    for label, key in (("G", "netG"), ("Corr", "netCorr")):
        load_reference(nets[key], {k: torch.zeros(s) for k, s in shapes[label].items()}, label)
    count = sum(p.numel() for p in nets.parameters())
    trunk = sum(p.numel() for p in nets["netCorr"].layer.parameters())
    assert count == 155_979_976 and trunk == 11_929_988


def test_mismatch_raises_with_keys_and_hint():
    opt = parse(["--recipe", "celebahq", "--ngf", "16", "--adaptor_kernel", "3"], mode="train")
    nets = build_networks(opt, with_D=False)
    state = _random_state(reference_state_shapes(16, 16, 19, 4)["Corr"])  # trained with adaptor_kernel 4
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*layer2.*--adaptor_kernel"):
        load_reference(nets["netCorr"], state, "Corr")
    del state["theta.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing from the checkpoint \(1\): theta.bias.*not in the model \(1\): extra.weight"):
        load_reference(nets["netCorr"], state, "Corr")


def test_cli_converts_and_writes_options(tmp_path):
    shapes = reference_state_shapes(16, 16, 20, 4, maskmix=False)
    src = tmp_path / "ref"
    src.mkdir()
    for label in ("G", "Corr", "D"):
        torch.save(_random_state(shapes[label]), src / f"latest_net_{label}.pth")
    out = tmp_path / "out"
    main(["--checkpoint_dir", str(src), "--out", str(out), "--with_D", "--recipe", "deepfashion", "--ngf", "16", "--ndf", "16"])
    assert sorted(os.listdir(out)) == ["latest_net_Corr.pth", "latest_net_D.pth", "latest_net_G.pth", "options.json"]
    assert json.loads((out / "options.json").read_text())["adaptor_kernel"] == 4
    opt = parse(["--recipe", "deepfashion", "--ngf", "16", "--ndf", "16"], mode="train")
    nets = build_networks(opt, with_D=True)
    for label, key in (("G", "netG"), ("Corr", "netCorr"), ("D", "netD")):
        nets[key].load_state_dict(torch.load(out / f"latest_net_{label}.pth", weights_only=True), strict=True)
    assert load_reference_checkpoints(nets, str(out)) == {"G": [], "Corr": [], "D": []}  # our keys pass unchanged
    os.remove(src / "latest_net_G.pth")
    with pytest.raises(FileNotFoundError, match="latest_net_G.pth"):
        main(["--checkpoint_dir", str(src), "--out", str(out), "--recipe", "deepfashion", "--ngf", "16"])
