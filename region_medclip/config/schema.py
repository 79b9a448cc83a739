"""The config schema: every section and key a config may set, with its default.

Config files (``configs/*.py``) start from :func:`base_config` and change what their recipe
needs; :func:`region_medclip.config.validate` rejects any key or type that is not here.
"""

import math

import ml_collections

SOFTMAX_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGMOID_LOGIT_SCALE_INIT = math.log(10.0)


def base_config() -> ml_collections.ConfigDict:
    """The full schema with ViT-B/16 + CLIP text defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # Tower sections go straight into the module constructors (models/vit.py, text.py, region.py).
    c.model.image = dict(variant="B/16", pool="cls")
    c.model.text = dict(kind="clip", variant="B", vocab_size=49408, context_len=77)
    c.model.region = dict(roi_size=4, sampling_ratio=2, pool="mean", proj="shared")
    c.model.embed_dim = 512
    c.model.logit_scale_init = SOFTMAX_LOGIT_SCALE_INIT
    c.model.logit_bias_init = -10.0
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = False
    c.model.init_from = ""  # a `convert` output dir or a checkpoint of this project

    c.loss = ml_collections.ConfigDict()
    c.loss.global_kind = "softmax"  # softmax | sigmoid | medclip | dhn_nce
    c.loss.alpha = 1.0  # L_global
    c.loss.beta = 1.0  # L_ROI
    c.loss.gamma = 1.0  # L_neg
    c.loss.lambda_ = 0.3  # L_distill; only applies when a teacher is configured
    c.loss.roi_temperature = 0.0  # > 0: fixed τ for the region losses; 0: the learned scale
    c.loss.sigmoid_impl = "ring"  # ring | gather
    c.loss.dhn_nce = dict(temperature=0.6, beta1=0.15, beta2=0.15, reduction="mean")
    c.loss.medclip = dict(label_temperature=1.0)

    c.data = ml_collections.ConfigDict()
    c.data.train = "synth_cxr"
    c.data.eval = "synth_cxr"
    c.data.image_size = 224
    c.data.max_rois = 4
    c.data.text_len = 77  # report tokens
    c.data.caption_len = 0  # box-caption and hard-negative tokens; 0: text_len
    c.data.num_negatives = 4
    c.data.tokenizer = "clip_bpe"  # clip_bpe | hf | synth_bpe (data/tokenizers.py)
    c.data.tokenizer_path = ""  # clip_bpe: merges file (default: open_clip's); hf: a directory
    c.data.data_dir = "~/tensorflow_datasets"  # where TFDS builders write and read
    c.data.synth = dict(num=26_000, seed=0)  # synth_cxr: films (all splits) and generator seed
    c.data.strict = False  # True: a bad record stops the run instead of being skipped
    c.data.batch_size = 256
    c.data.workers = 0
    c.data.augment = True
    # Probability that a training report is cut to a random subset of its sentences.
    c.data.report_sentences = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 1000
    c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.optim.weight_decay = 0.2
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.mu_dtype = "float32"
    c.optim.tower_lr = dict(image=1.0, text=1.0, region=1.0, head=1.0)
    c.optim.freeze = dict(image=False, text=False, region=False)

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 10_000
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.keep = 3
    c.train.eval_every = 1000
    c.train.grad_accum = 1  # micro-batches per step (contrastive negatives stay per micro-batch)
    c.train.max_bad_steps = 10  # this many non-finite steps in a row abort the run

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by fsdp
    c.mesh.fsdp = 1

    c.teacher = ml_collections.ConfigDict()
    c.teacher.init_from = ""
    c.teacher.temperature = 0.01
    # How the teacher embeds ROIs: head (its region tower) | crops (each box cropped and encoded
    # as an image, as RegionCLIP's CLIP teacher) | auto (crops for a converted CLIP, else head).
    c.teacher.regions = "auto"

    c.evals = ml_collections.ConfigDict()
    return c
