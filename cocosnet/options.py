"""CoCosNet's command-line options: the reference's names and defaults, plus `--backend` and `--recipe`.

    from cocosnet.options import parse
    opt = parse(["--recipe", "ade20k", "--dataroot", "data/ADEChallengeData2016/images"], mode="train")

`build_parser(mode)` holds the reference's base + train (mode "train") or base + test (mode "test")
options with the reference's defaults after its generator/dataset option setters ran (e.g. `norm_G`
spectralspadesyncbatch3x3, `n_layers_D` 4, `num_D` 2). `parse` applies, in order of increasing
precedence: those defaults, the dataset's defaults (`--dataset_mode`: label_nc, load_size, ...), the
`--recipe` preset (the flags of the reference's training/test commands for that dataset), and what
the command line gives explicitly. It then fills the derived fields (`isTrain`, `semantic_nc`,
`down`) and checks the values.

A recipe's (or a dataset's) on/off flags are defaults too: `--unset PONO maskmix` turns flags off
after them.
"""
from __future__ import annotations

import argparse
import sys

import cocos_kernels as ck

MODES = ("train", "test")

# The dataset option setters of the reference (data/<mode>_dataset.py), train / test.
DATASET_DEFAULTS = {
    "ade20k": dict(label_nc=150, contain_dontcare_label=True),
    "celebahq": dict(label_nc=19, contain_dontcare_label=False, no_pairing_check=True),
    "celebahqedge": dict(label_nc=15, contain_dontcare_label=False, no_pairing_check=True),
    "deepfashion": dict(label_nc=20, contain_dontcare_label=False, no_pairing_check=True),
}
# Datasets whose 'label' is a stack of float maps (edges, pose) rather than a class-id map.
DENSE_LABEL_DATASETS = ("celebahqedge", "deepfashion")

# Flags common to every released v1 model (the reference README's commands).
_COMMON = dict(PONO=True, PONO_C=True, vgg_normal_correct=True, use_attention=True)
# Per-dataset flags of the reference README's commands. adaptor_kernel 4
# is what the released CelebA-HQ and DeepFashion weights need (their test commands pass it).
RECIPES = {
    "ade20k": dict(
        _COMMON, dataset_mode="ade20k", maskmix=True, warp_mask_losstype="direct", weight_mask=100.0,
        niter=100, niter_decay=100,
    ),
    "celebahq": dict(
        _COMMON, dataset_mode="celebahq", maskmix=True, warp_mask_losstype="direct", weight_mask=100.0,
        which_perceptual="4_2", weight_perceptual=0.001, fm_ratio=1.0, warp_bilinear=True, warp_cycle_w=0.1,
        adaptor_kernel=4, niter=30, niter_decay=30,
    ),
    "celebahqedge": dict(
        _COMMON, dataset_mode="celebahqedge", maskmix=True, which_perceptual="4_2", weight_perceptual=0.001,
        fm_ratio=1.0, warp_bilinear=True, warp_cycle_w=1.0, adaptor_kernel=4, niter=30, niter_decay=30,
    ),
    "deepfashion": dict(
        _COMMON, dataset_mode="deepfashion", real_reference_probability=0.0, which_perceptual="4_2",
        weight_perceptual=0.001, fm_ratio=1.0, warp_bilinear=True, warp_self_w=100.0, no_flip=True,
        warp_patch=True, video_like=True, adaptor_kernel=4, niter=50, niter_decay=50,
    ),
}


def _base(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--name", type=str, default="label2coco", help="experiment name: where samples and models are stored")
    g.add_argument("--checkpoints_dir", type=str, default="./checkpoints", help="models are saved here")
    g.add_argument("--phase", type=str, default="train", help="train, val, test, etc.")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="per-dataset preset: the flags of the reference's command for that dataset "
                        "(explicit command-line values still win)")
    g.add_argument("--unset", nargs="+", default=[], metavar="FLAG",
                   help="on/off flags to turn off after the --recipe and --dataset_mode defaults, by name "
                        "without dashes (e.g. --unset PONO maskmix)")
    g.add_argument("--backend", choices=ck.backend_names(), default="auto",
                   help="cocos_kernels backend for every HW x HW computation (correspondence, the generator's "
                        "attention, the contextual loss); 'reference' is the materialised baseline")

    g = p.add_argument_group("input/output sizes")
    g.add_argument("--batchSize", type=int, default=4, help="input batch size")
    g.add_argument("--preprocess_mode", type=str, default="scale_width_and_crop",
                   choices=("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "scale_shortside",
                            "scale_shortside_and_crop", "fixed", "none"),
                   help="scaling and cropping of images at load time")
    g.add_argument("--load_size", type=int, default=256, help="scale images to this size, then crop to --crop_size")
    g.add_argument("--crop_size", type=int, default=256, help="crop to this width (a multiple of 32: G starts at crop_size/32)")
    g.add_argument("--aspect_ratio", type=float, default=1.0, help="width/height of the final image")
    g.add_argument("--label_nc", type=int, default=182, help="number of input label classes without the unknown class")
    g.add_argument("--contain_dontcare_label", action="store_true", help="the label map has a dontcare label (255)")
    g.add_argument("--output_nc", type=int, default=3, help="number of output image channels")

    g = p.add_argument_group("data")
    g.add_argument("--dataroot", type=str, default="./datasets/ADEChallengeData2016/images", help="dataset root folder")
    g.add_argument("--dataset_mode", type=str, default="ade20k", choices=sorted(DATASET_DEFAULTS) + ["synthetic"],
                   help="dataset layout (ade20k, celebahq, celebahqedge, deepfashion, or synthetic on-the-fly data)")
    g.add_argument("--serial_batches", action="store_true", help="take images in order instead of shuffling")
    g.add_argument("--no_flip", action="store_true", help="do not flip images for data augmentation")
    g.add_argument("--nThreads", type=int, default=16, help="number of data-loading workers")
    g.add_argument("--max_dataset_size", type=int, default=sys.maxsize, help="load at most this many samples")
    g.add_argument("--no_pairing_check", action="store_true", help="skip the label/image file-name pairing check")
    g.add_argument("--video_like", action="store_true", help="DeepFashion: the pseudo exemplar is another pose of the same person")

    g = p.add_argument_group("networks")
    g.add_argument("--norm_G", type=str, default="spectralspadesyncbatch3x3",
                   help="G and adaptor SPADE blocks: [spectral]spade<param-free norm><k>x<k> (PONO replaces the norm)")
    g.add_argument("--norm_D", type=str, default="spectralinstance", help="discriminator conv norm: [spectral](instance|batch|none)")
    g.add_argument("--norm_E", type=str, default="spectralinstance", help="domain adaptor conv norm: [spectral](instance|batch|none)")
    g.add_argument("--ngf", type=int, default=64, help="number of generator (and adaptor) filters in the first conv layer")
    g.add_argument("--init_type", type=str, default="xavier", choices=("normal", "xavier", "kaiming", "orthogonal"),
                   help="network initialisation")
    g.add_argument("--init_variance", type=float, default=0.02, help="gain (std for 'normal') of the initialisation")
    g.add_argument("--CBN_intype", type=str, default="warp_mask", choices=("warp", "mask", "warp_mask"),
                   help="what conditions G's SPADE layers: the warped exemplar, the input one-hot map, or both")
    g.add_argument("--maskmix", action="store_true", help="concatenate the one-hot maps to the features in the correspondence trunk")
    g.add_argument("--use_attention", action="store_true", help="self-attention block in G (at crop_size/2) and D")
    g.add_argument("--warp_mask_losstype", type=str, default="none", choices=("none", "direct", "cycle"),
                   help="warped exemplar mask for the mask loss: none, direct (same softmax), or cycle (there and back)")
    g.add_argument("--show_warpmask", action="store_true", help="also compute the warped mask when the mask loss is off")
    g.add_argument("--match_kernel", type=int, default=3, help="k x k patch matching in the correlation (odd)")
    g.add_argument("--adaptor_kernel", type=int, default=3, help="kernel of the strided convs in the domain adaptors (4 in the released CelebA-HQ/DeepFashion models)")
    g.add_argument("--PONO", action="store_true", help="positional normalisation in SPADE (and channel centring in the contextual loss)")
    g.add_argument("--PONO_C", action="store_true", help="centre correlation features over channels (else over positions)")
    g.add_argument("--vgg_normal_correct", action="store_true", help="feed the Caffe VGG-19 BGR 0..255 input (else the reference's mis-scaled input)")
    g.add_argument("--vgg_path", type=str, default="models/vgg19_conv.pth",
                   help="VGG-19 weights: the reference's Caffe-converted vgg19_conv.pth or a torchvision vgg19 state dict")
    g.add_argument("--vgg_convention", type=str, default="auto", choices=("auto", "caffe", "torchvision"),
                   help="input convention of --vgg_path: caffe (BGR 0..255, mean only), torchvision (RGB, ImageNet mean/std), "
                        "auto (from the key names)")
    g.add_argument("--vgg_random_init", action="store_true",
                   help="use a randomly initialised VGG-19 instead of --vgg_path (smoke tests only: VGG losses are meaningless)")
    g.add_argument("--warp_cycle_w", type=float, default=0.0, help="weight of the cycle loss: warp back to the exemplar")
    g.add_argument("--two_cycle", action="store_true", help="also warp the input to the exemplar and back (cycle loss)")
    g.add_argument("--warp_bilinear", action="store_true", help="upsample the warped exemplar bilinearly (else nearest)")
    g.add_argument("--use_coordconv", action="store_true", help="append coordinate channels to the correspondence features")
    g.add_argument("--warp_patch", action="store_true", help="warp full-resolution warp_stride x warp_stride patches")
    g.add_argument("--warp_stride", type=int, default=4, choices=(2, 4), help="correspondence grid = image side / warp_stride")
    g.add_argument("--mask_noise", action="store_true", help="add 0.1 Gaussian noise to the nonzero input mask in the adaptor")
    g.add_argument("--noise_for_mask", action="store_true",
                   help="replace the exemplar mask in the trunk with 0.01 noise (at test, and in training after --mask_epoch)")
    g.add_argument("--show_corr", action="store_true", help="also output the bilinearly upsampled warp ('warp_out_bi')")


def _train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("display and checkpoints")
    g.add_argument("--display_freq", type=int, default=2000, help="iterations between image grids")
    g.add_argument("--print_freq", type=int, default=100, help="iterations between loss prints")
    g.add_argument("--save_latest_freq", type=int, default=5000, help="iterations between 'latest' checkpoints")
    g.add_argument("--save_epoch_freq", type=int, default=10, help="epochs between numbered checkpoints")
    g.add_argument("--continue_train", action="store_true", help="resume from the checkpoint --which_epoch")
    g.add_argument("--which_epoch", type=str, default="latest", help="checkpoint epoch to load")

    g = p.add_argument_group("optimisation")
    g.add_argument("--niter", type=int, default=100, help="epochs at the initial learning rate")
    g.add_argument("--niter_decay", type=int, default=100, help="epochs of linear decay to zero after --niter")
    g.add_argument("--optimizer", type=str, default="adam", choices=("adam",), help="optimiser")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (used only with --no_TTUR)")
    g.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (used only with --no_TTUR)")
    g.add_argument("--lr", type=float, default=0.0002, help="initial learning rate (TTUR: G and Corr lr/2, D lr*2)")
    g.add_argument("--D_steps_per_G", type=int, default=1, help="discriminator steps per generator step")
    g.add_argument("--no_TTUR", action="store_true", help="same lr for G and D with --beta1/--beta2 (else TTUR, betas (0, 0.9))")

    g = p.add_argument_group("discriminator and losses")
    g.add_argument("--ndf", type=int, default=64, help="number of discriminator filters in the first conv layer")
    g.add_argument("--n_layers_D", type=int, default=4, help="layers in each discriminator")
    g.add_argument("--num_D", type=int, default=2, help="number of discriminator scales")
    g.add_argument("--gan_mode", type=str, default="hinge", choices=("hinge", "ls", "original", "w"), help="adversarial loss")
    g.add_argument("--lambda_feat", type=float, default=10.0, help="weight of the discriminator feature-matching loss")
    g.add_argument("--lambda_vgg", type=float, default=10.0, help="weight of the VGG losses (fm and contextual)")
    g.add_argument("--no_ganFeat_loss", action="store_true", help="drop the discriminator feature-matching loss")
    g.add_argument("--which_perceptual", type=str, default="5_2", choices=("5_2", "4_2"), help="VGG layer of the perceptual loss")
    g.add_argument("--weight_perceptual", type=float, default=0.01, help="weight of the perceptual loss")
    g.add_argument("--weight_mask", type=float, default=0.0, help="weight of the warped-mask loss (direct/cycle)")
    g.add_argument("--real_reference_probability", type=float, default=0.7, help="probability of a retrieved (not pseudo) exemplar")
    g.add_argument("--hard_reference_probability", type=float, default=0.2, help="probability of the hard retrieved exemplar")
    g.add_argument("--weight_gan", type=float, default=10.0, help="weight of the adversarial losses (G and D)")
    g.add_argument("--novgg_featpair", type=float, default=10.0, help="weight of the domain alignment loss")
    g.add_argument("--warp_self_w", type=float, default=0.0, help="weight of the warp-to-ground-truth loss on pseudo pairs")
    g.add_argument("--fm_ratio", type=float, default=0.1, help="pseudo-pair VGG feature-matching weight relative to lambda_vgg")
    g.add_argument("--use_22ctx", action="store_true", help="add relu2_2 (avg-pooled 4x) to the contextual loss")
    g.add_argument("--ctx_w", type=float, default=1.0, help="contextual loss weight relative to lambda_vgg")
    g.add_argument("--mask_epoch", type=int, default=-1, help="with --noise_for_mask: epochs trained with the exemplar mask first")


def _test(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test")
    g.add_argument("--results_dir", type=str, default="./results/", help="results are saved here")
    g.add_argument("--which_epoch", type=str, default="latest", help="checkpoint epoch to load")
    g.add_argument("--how_many", type=int, default=sys.maxsize, help="how many test images to run")
    g.add_argument("--save_per_img", action="store_true", help="save one file per image instead of grids")
    p.set_defaults(serial_batches=True, no_flip=True, phase="test", preprocess_mode="scale_width_and_crop",
                   crop_size=256, load_size=256)


def build_parser(mode: str = "train") -> argparse.ArgumentParser:
    """The argparse parser of `python -m cocosnet.train` (mode "train") or the test/inference tools ("test")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=f"CoCosNet {mode} options (reference option names and defaults)")
    _base(p)
    (_train if mode == "train" else _test)(p)
    _extra(p, mode)
    return p


def _dataset_defaults(dataset_mode: str, mode: str) -> dict:
    if dataset_mode not in DATASET_DEFAULTS:
        return {}
    return dict(DATASET_DEFAULTS[dataset_mode], preprocess_mode="resize_and_crop", crop_size=256,
                load_size=286 if mode == "train" else 256)


def parse(args: list[str] | None = None, mode: str = "train") -> argparse.Namespace:
    """Parse `args` (sys.argv[1:] when None) for `mode`, apply dataset and recipe defaults, fill derived fields."""
    parser = build_parser(mode)
    first, _ = parser.parse_known_args(args)
    recipe = RECIPES[first.recipe] if first.recipe else {}
    dataset_mode = recipe.get("dataset_mode", first.dataset_mode)
    # An explicit --dataset_mode wins over the recipe's, as every other explicit value does.
    explicit = parser.parse_known_args(args, namespace=argparse.Namespace(dataset_mode=None))[0].dataset_mode
    if explicit is not None:
        dataset_mode = explicit
    defaults = {**_dataset_defaults(dataset_mode, mode), **recipe, "dataset_mode": dataset_mode}
    if mode == "test":
        defaults.update(serial_batches=True, no_flip=True, phase="test")
    # A recipe's training-only values (weight_mask, niter, ...) land in a test namespace unused.
    parser.set_defaults(**defaults)
    opt = parser.parse_args(args)
    flags = {a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction)}
    for name in opt.unset:
        if name not in flags:
            raise ValueError(f"--unset {name}: not an on/off flag of this tool (flags: {', '.join(sorted(flags))})")
        setattr(opt, name, False)
    return finish(opt, mode)


def finish(opt: argparse.Namespace, mode: str) -> argparse.Namespace:
    """Fill the derived fields of a parsed `opt` and check its values (raises ValueError)."""
    opt.isTrain = mode == "train"
    opt.semantic_nc = opt.label_nc + (1 if opt.contain_dontcare_label else 0)
    opt.down = 2 if opt.warp_stride == 2 else 4
    if opt.label_nc < 1:
        raise ValueError(f"--label_nc must be >= 1, got {opt.label_nc}")
    if opt.match_kernel < 1 or opt.match_kernel % 2 == 0:
        raise ValueError(f"--match_kernel must be an odd number >= 1, got {opt.match_kernel}")
    if opt.crop_size % 32 != 0:
        raise ValueError(f"--crop_size must be a multiple of 32 (G starts at crop_size/32), got {opt.crop_size}")
    if opt.ngf < 8 or opt.ngf % 8 != 0:
        raise ValueError(f"--ngf must be a multiple of 8 (attention uses ngf*4/8 channels), got {opt.ngf}")
    if opt.dataset_mode in DENSE_LABEL_DATASETS and opt.warp_mask_losstype != "none":
        raise ValueError(f"--warp_mask_losstype {opt.warp_mask_losstype} needs a class-id label map; "
                         f"--dataset_mode {opt.dataset_mode} has dense label channels: use 'none'")
    if opt.isTrain:
        if opt.ndf < 8 or opt.ndf % 8 != 0:
            raise ValueError(f"--ndf must be a multiple of 8 (D's attention uses ndf*4/8 channels), got {opt.ndf}")
        if opt.n_layers_D < 2:
            raise ValueError(f"--n_layers_D must be >= 2, got {opt.n_layers_D}")
    return opt


# ----------------------------------------------------------------------------------------------
# Data and training options (owned by the data/training side). Append below; keep the hook name.
# ----------------------------------------------------------------------------------------------
def _extra(p: argparse.ArgumentParser, mode: str) -> None:
    """Options of the data loaders and the training loop, added to every parser."""
    add_training_options(p, mode)


# --- data / training options ---
AMP_MODES = ("none", "bf16", "fp16")


def add_training_options(p: argparse.ArgumentParser, mode: str) -> None:
    """Seeds, exemplar lists, synthetic data, device, and (train) AMP and crash-safe checkpointing."""
    g = p.add_argument_group("data and training (cocosnet additions)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the data order and every random draw of the data")
    g.add_argument("--ref_dir", type=str, default="./data",
                   help="folder of the exemplar lists <dataset>_ref.txt / <dataset>_ref_test.txt "
                        "(the reference reads them from ./data)")
    g.add_argument("--synthetic_size", type=int, default=64, help="--dataset_mode synthetic: number of scenes")
    g.add_argument("--synthetic_mixes", type=int, default=4,
                   help="--dataset_mode synthetic: number of class mixes (exemplars share their scene's mix)")
    g.add_argument("--gpu_ids", type=str, default="0",
                   help="GPU to use ('-1' for the CPU); under torchrun each process takes its LOCAL_RANK")
    if mode != "train":
        return
    g.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="mixed precision: bf16 or fp16 autocast (fp16 with a gradient scaler); the reference has none")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="training-state checkpoints kept (the newest K; older ones are deleted)")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop after this many consecutive steps skipped for a NaN/Inf loss or gradient")
    g.add_argument("--max_steps", type=int, default=0,
                   help="stop (saving a checkpoint) after this many iterations in total; 0 for no limit")
    g.add_argument("--no_tensorboard", action="store_true", help="do not write TensorBoard logs")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each residual block's activations (correspondence adaptors and trunk, G) in the "
                        "backward instead of keeping them: far less memory at 512 px and above, about a third more "
                        "compute; not in the reference")
