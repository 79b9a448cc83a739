"""``python -m region_medclip.bench openclip --openclip_seconds=S``: what a user who picked
open_clip instead would get on the embedded films in the same wall clock.

open_clip's CLIP at the tiny recipe's sizes (its ViT with a class token and a linear patch
embedding, its causal text tower pooled at the end-of-text token, CLIP's BPE tokenizer at 77
tokens), open_clip's ``ClipLoss`` and step, AdamW with the recipe's learning rate, warmup and
gradient clipping and a cosine decay over the wall-clock budget, float32 on every core. It reads
the same synth_cxr training films and reports through our pipeline (reports only: open_clip has
no region loss). When the budget is spent its weights are imported (``weights/open_clip.py``)
and scored by our zero-shot and retrieval evaluators, with the default's settings, on the same
test films as the default run.
"""

import math
import os
import time

import jax
import numpy as np

from region_medclip.bench import common, compare
from region_medclip.data import pipeline
from region_medclip.evaluators import run as eval_run
from region_medclip.models import clip
from region_medclip.weights import open_clip as open_clip_weights

EVALUATORS = ("zero_shot", "retrieval")


def case_config(args):
    """The tiny recipe as open_clip would train it: its towers, tokenizer and global loss only."""
    config = common.load_config(args.configs_dir, "tiny_roi.py", "text=clip")
    config.model.image.update(pool="cls", stem="patch")
    config.model.text.update(vocab_size=49408, context_len=77)
    config.data.update(tokenizer="clip_bpe", text_len=77, caption_len=0, num_negatives=0)
    config.loss.update(global_kind="softmax", beta=0.0, gamma=0.0, lambda_=0.0)
    config.seed = args.openclip_seed
    return config


def _learning_rate(config, step: int, fraction: float) -> float:
    """Linear warmup over ``optim.warmup_steps``, then a cosine over the budget's time left."""
    peak, warmup = config.optim.lr, config.optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0)))


def train(config, seconds: float) -> tuple[dict, dict]:
    """Trains open_clip for ``seconds`` of wall clock: ``(state dict as numpy, stats)``."""
    import open_clip
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    model = compare.open_clip_model(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        betas=(config.optim.b1, config.optim.b2),
        weight_decay=config.optim.weight_decay,
    )
    loss_fn = open_clip.loss.ClipLoss()
    batches = iter(
        pipeline.make_dataset(
            config.data,
            split="train",
            train=True,
            seed=config.seed,
            batch_size=config.data.batch_size,
        )
    )
    start, step, warm_end, losses = time.perf_counter(), 0, None, []
    while (elapsed := time.perf_counter() - start) < seconds:
        if step == config.optim.warmup_steps:
            warm_end = elapsed
        fraction = 0.0 if warm_end is None else (elapsed - warm_end) / (seconds - warm_end)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step, fraction)
        batch = next(batches)
        images = torch.from_numpy(np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2)))
        texts = torch.from_numpy(batch["texts"].astype(np.int64))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images, texts))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        step += 1
    elapsed = time.perf_counter() - start
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    stats = dict(
        steps=step,
        seconds=round(elapsed, 1),
        examples_per_s=round(step * config.data.batch_size / elapsed, 2),
        final_loss=round(float(np.mean(losses[-50:])), 4),
    )
    return state, stats


def imported(config, state: dict) -> tuple[object, dict]:
    """Our ``RegionCLIP`` and params holding open_clip's trained towers (the region head, which
    the zero-shot and retrieval evaluators do not read, at its initialisation)."""
    fields = open_clip_weights.model_config(compare.open_clip_cfg(config))
    model_config = config.model.copy_and_resolve_references()
    model_config.image, model_config.text = fields["image"], fields["text"]
    model = clip.from_config(model_config)
    inputs = clip.example_inputs(config.data)
    params = model.init(
        jax.random.PRNGKey(0), **{k: np.zeros(v.shape, v.dtype) for k, v in inputs.items()}
    )
    params = dict(params["params"])
    params.update(open_clip_weights.to_params(state, fields, source="open_clip (trained here)"))
    return model, params


def run(args) -> tuple[dict, str]:
    """Trains open_clip for ``--openclip_seconds`` and evaluates it: (results, report)."""
    config = case_config(args)
    state, stats = train(config, args.openclip_seconds)
    model, params = imported(config, state)
    config.evals = {name: config.evals[name] for name in EVALUATORS}
    results = eval_run.evaluate(config, model, params, names=list(EVALUATORS))
    row = dict(
        **stats,
        zero_shot_macro_auroc=round(results["zero_shot"]["macro_auroc"], 4),
        i2t_r5=round(results["retrieval"]["i2t/R@5"], 4),
        t2i_r5=round(results["retrieval"]["t2i/R@5"], 4),
    )
    machine = dict(processor=common.cpu_model(), cpus=os.cpu_count())
    report = f"{machine}\n" + common.markdown([row], list(row))
    return dict(machine=machine, row=row, evaluation=results), report
