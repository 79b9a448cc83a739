"""Tiny ViT + tiny CLIP text tower on the synthetic chest X-rays: minutes on a laptop CPU.

python -m region_medclip.summary --config=configs/tiny_roi.py
"""

from configs import common
from region_medclip import config_lib


def get_config(arg: str | None = None):
    """``arg``: ``res=`` image size, ``variant=`` ViT variant, ``steps=`` total steps."""
    args = config_lib.parse_arg(arg, res=128, variant="Ti/16", steps=3000)
    c = common.base_config()
    c.model.image = dict(variant=args.variant, depth=4, pool="cls")
    c.model.text = dict(
        kind="clip", variant="Ti", vocab_size=4096, context_len=64, width=128, mlp_dim=512, heads=4
    )
    c.model.region = dict(roi_size=2, sampling_ratio=2, pool="mean", proj="shared")
    c.model.embed_dim = 128

    c.data.image_size = args.res
    c.data.text_len = 64
    c.data.tokenizer = "synth_bpe"
    c.data.batch_size = 64
    c.data.max_rois = 4
    c.data.num_negatives = 3

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.05

    c.train.total_steps = args.steps
    c.train.log_every = 20
    c.train.ckpt_every = 500
    c.train.eval_every = 1000
    c.loss.lambda_ = 0.0
    return c
