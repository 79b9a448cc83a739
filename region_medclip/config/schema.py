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
    c.model = _model()
    c.loss = _loss()
    c.data = _data()
    c.optim = _optim()
    c.train = _train()
    c.mesh = _mesh()
    c.teacher = _teacher()
    c.evals = ml_collections.ConfigDict()  # name → dict(kind=..., ...): evaluators/registry.py
    return c


def _model() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # Tower sections go straight into the module constructors (models/vit.py, text.py, region.py).
    s.image = dict(variant="B/16", pool="cls")
    s.text = dict(kind="clip", variant="B", vocab_size=49408, context_len=77)
    s.region = dict(roi_size=4, sampling_ratio=2, pool="mean", proj="shared")
    # A box and an objectness logit from every patch token (models/boxes.py): the proposals of
    # open-vocabulary detection; trained by loss.box_weight, off unless enabled.
    s.box_head = dict(enabled=False, depth=2, detach=True)
    s.embed_dim = 512
    s.logit_scale_init = SOFTMAX_LOGIT_SCALE_INIT
    s.logit_bias_init = -10.0
    s.dtype = "float32"
    s.param_dtype = "float32"
    s.remat = False
    # xla | cudnn: cuDNN's fused attention (NVIDIA GPUs, bfloat16 or float16 compute).
    s.attention = "xla"
    s.init_from = ""  # a `convert` output dir or a checkpoint of this project
    return s


def _loss() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.global_kind = "softmax"  # softmax | sigmoid | medclip | dhn_nce
    s.alpha = 1.0  # L_global
    s.beta = 1.0  # L_ROI
    s.gamma = 1.0  # L_neg
    s.lambda_ = 0.3  # L_distill; only applies when a teacher is configured
    s.roi_temperature = 0.0  # > 0: fixed τ for the region losses; 0: the learned scale
    s.sigmoid_impl = "ring"  # ring | gather
    s.dhn_nce = dict(temperature=0.6, beta1=0.15, beta2=0.15, reduction="mean")
    s.medclip = dict(label_temperature=1.0)
    # GLoRIA's word–patch loss (docs/design.md §4.6): each report word attends over the image's
    # patch cells; its weight μ (0: off, nothing of it is computed).
    s.local_weight = 0.0
    # GLoRIA's temp1 (attention), temp2 (over words), temp3 (the cross-entropy's multiplier), and
    # the cells per axis of the patch grid the words attend over (0: the image tower's own grid).
    s.gloria = dict(temperature1=4.0, temperature2=5.0, temperature3=10.0, grid=0)
    # The box head's loss (losses/boxes.py), weight ν (0: off): DETR's L1 and generalised-IoU
    # weights on the cells a finding box is assigned to, and the objectness cross-entropy's.
    s.box_weight = 0.0
    s.box = dict(l1=5.0, giou=2.0, objectness=1.0)
    return s


def _data() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.train = "synth_cxr"
    s.eval = "synth_cxr"
    s.image_size = 224
    s.max_rois = 4
    s.text_len = 77  # report tokens
    s.caption_len = 0  # box-caption and hard-negative tokens; 0: text_len
    s.num_negatives = 4
    # Hard-negative reports per image for the softmax global loss (NegCLIP): the report with a
    # finding, side or zone changed, as extra negatives of its image→report row; 0: none.
    s.report_negatives = 0
    s.tokenizer = "clip_bpe"  # clip_bpe | hf | synth_bpe (data/tokenizers.py)
    s.tokenizer_path = ""  # clip_bpe: merges file (default: open_clip's); hf: a directory
    s.data_dir = "~/tensorflow_datasets"  # where TFDS builders write and read
    s.synth = dict(num=26_000, seed=0)  # synth_cxr: films (all splits) and generator seed
    s.strict = False  # True: a bad record stops the run instead of being skipped
    s.batch_size = 256
    s.workers = 0
    s.augment = True
    # Probability that a training film is squeezed to a random aspect in [3:5, 1] and padded
    # back to a square, as every non-square film is presented (transforms.AspectPad).
    s.aspect_pad = 0.0
    # Probability that a training report is cut to a random subset of its sentences.
    s.report_sentences = 0.0
    return s


def _optim() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.lr = 5e-4
    s.warmup_steps = 1000
    s.schedule = "cosine"  # cosine | linear | constant (after warmup)
    s.weight_decay = 0.2
    s.grad_clip = 1.0
    s.b1 = 0.9
    s.b2 = 0.98
    s.mu_dtype = "float32"
    s.tower_lr = dict(image=1.0, text=1.0, region=1.0, head=1.0)
    s.freeze = dict(image=False, text=False, region=False)
    # Train only the last N blocks of a tower and what follows them (LiT's partial unlocking);
    # -1: every block.
    s.unlock = dict(image=-1, text=-1)
    # Layer-wise learning-rate decay (BEiT, ELECTRA): block i of L gets lr · decay^(L − i), the
    # embeddings lr · decay^(L + 1), the heads lr; 1.0: off.
    s.layer_decay = 1.0
    return s


def _train() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.total_steps = 10_000
    s.log_every = 50
    s.ckpt_every = 1000
    s.keep = 3
    s.eval_every = 1000
    s.grad_accum = 1  # micro-batches per step
    # global: every micro-batch's rows meet the negatives of the whole batch (GradCache: embed
    # all micro-batches without gradients, take the loss over the batch, replay each with the
    # loss's gradient of its embeddings); micro: each micro-batch only its own negatives.
    s.accum_negatives = "global"
    # Exponential moving average of the params, evaluated beside them; 0: none.
    s.ema_decay = 0.0
    s.max_bad_steps = 10  # this many non-finite steps in a row abort the run
    return s


def _mesh() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.data = -1  # -1: every device not used by fsdp
    s.fsdp = 1
    return s


def _teacher() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.init_from = ""
    s.temperature = 0.01
    # How the teacher embeds ROIs: head (its region tower) | crops (each box cropped and encoded
    # as an image, as RegionCLIP's CLIP teacher) | auto (crops for a converted CLIP, else head).
    s.regions = "auto"
    return s
