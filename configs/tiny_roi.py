"""Tiny ViT + tiny CLIP text tower on the synthetic chest X-rays: minutes on a laptop CPU.

python -m region_medclip.summary --config=configs/tiny_roi.py
"""

from region_medclip import config as config_lib


def get_config(arg: str | None = None):
    """``arg``: ``res=`` image size, ``variant=`` ViT variant, ``steps=`` total steps,
    ``text=bert|clip`` the text tower, ``text_from=`` a ``convert --format=hf_bert`` output to
    start the text tower from, ``data=`` a dataset to train and evaluate on instead of
    synth_cxr (a registered one, or your own prepared with ``python -m region_medclip.prepare
    --dataset=csv --name=NAME``)."""
    args = config_lib.parse_arg(
        arg, res=96, variant="Ti/16", steps=1500, text="bert", text_from="", data="synth_cxr"
    )
    c = config_lib.base_config()
    # Attention pooling (MAP) over the patch tokens: the global embedding is built from the same
    # tokens the region losses train, and a learned probe can weigh the few tokens a small
    # finding covers, where their mean dilutes them among 36 (on validation: zero-shot 0.912
    # against 0.897 with the mean, pointing game at 8 px 0.976 against 0.902).
    # The hierarchical MLP stem: with CLIP's linear patch embedding the loss took twice the steps
    # to fall as far, and small findings inside a 16-px patch stayed hard to see.
    # Six layers: the image tower is what limits the small findings (a linear probe on the
    # 4-layer tower's embedding read nodules at AUROC 0.82), so it takes the FLOPs that one hard
    # negative a box and 14-token captions save in the text tower (62.6 GFLOP a step, against
    # 60.3 with 4 layers, 2 negatives and 16 tokens).
    c.model.image = dict(variant=args.variant, depth=6, pool="map", stem="hmlp")
    # One text layer: the synthetic reports are templated, and on validation each layer taken
    # away read better zero-shot in the same steps (macro AUROC 0.889 with 4 layers, 0.904 with
    # 2, 0.909 with 1) while the step got cheaper (docs/results.md, what moved the metrics).
    size = dict(vocab_size=4096, context_len=64, width=128, mlp_dim=512, heads=4, depth=1)
    if args.text == "bert":
        # Bidirectional and mean-pooled: every report token gets the global loss's gradient, and
        # "No" sees the finding it negates. Trained from scratch it beat the causal, EOT-pooled
        # CLIP tower of the same size on every global metric (image→report R@5 0.26 vs 0.16).
        c.model.text = dict(kind="bert", variant="mu", pool="mean", **size)
    elif args.text == "clip":
        c.model.text = dict(kind="clip", variant="Ti", **size)
    else:
        raise ValueError(f"tiny_roi: text={args.text!r}; choose bert or clip")
    c.model.region = dict(roi_size=2, sampling_ratio=2, pool="mean", proj="shared")
    # The box head proposes a box a patch for detection without given boxes. It is detached and
    # clipped on its own, so the towers train exactly as without it (docs/results.md, on
    # validation: boxes grown from heatmaps reached mAP@0.4 0.13, its proposals 0.72).
    c.model.box_head = dict(enabled=True, depth=2, detach=True)
    c.model.embed_dim = 128

    # 96 px (6 × 6 patches): at 1200 steps it read as the 128-px recipe did at 2400.
    c.data.image_size = args.res
    c.data.text_len = 64
    c.data.tokenizer = "synth_bpe"
    c.data.caption_len = 14  # the longest box caption is 14 tokens with BOS and EOS
    c.data.batch_size = 32
    c.data.max_rois = 3  # synth_cxr gives every film three boxes
    # No hard-negative captions: their loss was ~0 from step 400 on, and they were a quarter of
    # the text tower's tokens.
    c.data.num_negatives = 0
    # 1500 steps of 32 (2.3 passes over the 20.8k training films) fit ten minutes with the
    # build and the evaluation on a 2-core CPU with a ~260 GFLOP/s float32 matmul peak.
    # The crop/rotation augmentation is off (the global loss stayed at chance twice as long
    # with it); half the films are squeezed to an aspect in [3:5, 1] and padded, as a real,
    # non-square film is presented: without it a 5:6 or 4:3 film read 0.19 lower.
    c.data.augment = False
    c.data.aspect_pad = 0.5

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05

    c.train.total_steps = args.steps
    c.train.log_every = 20
    c.train.ckpt_every = 200
    c.train.eval_every = args.steps  # evaluate once, at the end
    c.loss.lambda_ = 0.0
    # The region terms weighted 3: they are the signal that points the image tower at small
    # findings (the global report loss sees them only as a few words of a whole report); 3
    # against 2 read the nodule, atelectasis and the pointing game higher on validation.
    c.loss.beta = 3.0
    c.loss.gamma = 2.0
    c.loss.box_weight = 1.0
    for kind in ("zero_shot", "retrieval", "regions", "grounding", "modality_gap"):
        c.evals[kind] = dict(kind=kind, max_examples=600, bootstrap=200)
    # MedCLIP-style prompts (severity × finding × location, as every report places a finding),
    # phrased as the reports' sentences, against the normal-study prompts. Beside it the same
    # combinations as box captions ("small nodule in the right upper zone"), which the region
    # head trains on but the global embedding never sees, and CheXzero's "{finding}" /
    # "No {finding}." pairs.
    c.evals.zero_shot.prompts = "sentences"
    c.evals.zero_shot.negatives = "normal"
    c.evals.zero_shot_captions = dict(
        kind="zero_shot",
        prompts="combinatorial",
        negatives="normal",
        max_examples=600,
        bootstrap=200,
    )
    c.evals.zero_shot_paired = dict(kind="zero_shot", max_examples=600, bootstrap=200)
    # Half a 16-px patch (the scale of Zhang et al.'s 15 px at ~224 px); beside it 6 px, the same
    # fraction of a 96-px film as 8 px is of a 128-px one.
    c.evals.grounding.tolerance = 8.0
    c.evals.grounding_6px = dict(kind="grounding", tolerance=6.0, max_examples=600, bootstrap=200)
    # Findings found without their boxes (docs/results.md): from `evaluate` only (every=0).
    c.evals.detection = dict(kind="detection", every=0, prompts="combinatorial", max_examples=600)
    if args.data != "synth_cxr":
        _other_dataset(c, args.data)
    if args.text_from:
        config_lib.init_text_from(c, args.text_from)
    return c


def _other_dataset(c, name: str) -> None:
    """Trains and evaluates on ``name``: synth_cxr's own prompt sets give way to the report
    templates every dataset has (against the normal-study prompts)."""
    c.data.train = c.data.eval = name
    c.data.max_rois = 4
    c.evals.zero_shot.prompts = "templates"
    c.evals.detection.prompts = "templates"
    del c.evals["zero_shot_captions"]
