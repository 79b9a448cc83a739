"""The real recipe: ViT-B/16 at 224 px, 12-layer 512-wide CLIP text tower (or BERT), D = 512,
full region-aware loss.

    python -m region_medclip.summary --config=configs/vitb16_roi.py
    python -m region_medclip.summary --config=configs/vitb16_roi.py:text=bert
    ... --config=configs/vitb16_roi.py:runlocal,res=128   # laptop-sized, synthetic data
    ... --config=configs/vitb16_roi.py:init=CLIP,teacher=CLIP   # fine-tune an imported CLIP
"""

from region_medclip import config as config_lib


def get_config(arg: str | None = None):
    """``arg``: ``runlocal``, ``res=``, ``variant=`` (ViT), ``text=clip|bert``; ``init=`` a
    whole-model checkpoint (``convert`` output or workdir) to start from, its towers replacing
    these; ``text_from=`` a ``convert --format=hf_bert`` output for the text tower alone;
    ``teacher=`` a checkpoint to distil ROI-concept logits from (``loss.lambda_``)."""
    args = config_lib.parse_arg(
        arg, runlocal=False, res=224, variant="B/16", text="clip", init="", text_from="", teacher=""
    )
    c = config_lib.base_config()
    c.model.image = dict(variant=args.variant, pool="cls")
    if args.text == "clip":
        c.model.text = dict(kind="clip", variant="B", vocab_size=49408, context_len=77)
        c.data.tokenizer = "clip_bpe"
        c.data.text_len = 77
    elif args.text == "bert":
        # PubMedBERT / BioClinicalBERT / CXR-BERT shape; weights via `convert --format=hf_bert`.
        c.model.text = dict(kind="bert", variant="base", vocab_size=30522, pool="cls")
        c.data.tokenizer = "hf"
        c.data.tokenizer_path = ""  # the checkpoint's tokenizer directory, e.g. a convert output
        c.data.text_len = 128
    else:
        raise config_lib.ConfigError(f"config arg 'text': {args.text!r} is not clip or bert")
    c.data.caption_len = 32  # box captions and hard negatives are short phrases
    c.model.region = dict(roi_size=4, sampling_ratio=2, pool="mean", proj="shared")
    c.model.embed_dim = 512
    c.data.image_size = args.res
    c.data.batch_size = 1024
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.train.total_steps = 50_000

    if args.runlocal:
        c.data.batch_size = 8
        c.data.synth = dict(num=2000, seed=0)  # builds in seconds at 224 px
        c.optim.warmup_steps = 5
        c.train.total_steps = 20
        c.train.log_every = 1
        c.train.ckpt_every = 10
        c.train.eval_every = 10
    if args.init:
        config_lib.init_model_from(c, args.init)
    if args.text_from:
        config_lib.init_text_from(c, args.text_from)
    c.teacher.init_from = args.teacher
    return c
