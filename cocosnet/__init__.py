"""cocosnet: a faithful CoCosNet (microsoft/CoCosNet, CVPR 2020) on cocos_kernels.

Every (HW x HW) computation -- the correspondence warp and its cycle, the generator's
self-attention, the contextual loss -- runs through `cocos_kernels`, so the model trains at
512px and above; `--backend reference` gives the materialised reference path.

    cocosnet.options     the reference's options, recipes, --backend
    cocosnet.models      Pix2PixModel and the networks (reference parameter names)
    cocosnet.losses      the losses with the reference's weights and layers
    cocosnet.convert     reference checkpoints -> our modules (python -m cocosnet.convert --help)
"""
from cocos_kernels.extras import require

require("cocosnet (data, training, demo)", "PIL", "tqdm")
