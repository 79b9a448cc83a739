"""``python -m region_medclip.bench compare``: the same CLIP training step in open_clip (PyTorch,
CPU) and in region-medclip.

Both sides train the same architecture (ViT image tower + CLIP text tower, built from our config
on one side and from the equivalent open_clip config on the other) with the same global loss
(symmetric InfoNCE with a learned temperature), AdamW and float32, on random inputs of the same
shapes, in one process, one case after the other: the figures see the same machine and the same
load. Our step is the real train step of ``region_medclip.train`` with the region and
hard-negative terms switched off (open_clip has no region loss); the full region-aware step is
reported beside it.
"""

import os
import statistics
import time

import jax
import numpy as np

from region_medclip.bench import common
from region_medclip.bench import train as train_bench
from region_medclip.models import clip

# name -> (file in --configs_dir, its `:arg`). The tiny recipe's towers at its sizes with the CLIP
# text tower; `_case_configs` gives it open_clip's linear patch embedding and class-token pooling.
CASES = {
    "tiny_roi": ("tiny_roi.py", "text=clip"),
    "vitb16_roi:runlocal": ("vitb16_roi.py", "runlocal"),
}


def global_only(config):
    """``config`` with the region-aware terms and the box head off: the CLIP loss alone, as
    open_clip trains."""
    config = config.copy_and_resolve_references()
    config.loss.beta, config.loss.gamma, config.loss.lambda_ = 0.0, 0.0, 0.0
    config.loss.box_weight = 0.0
    config.model.box_head.enabled = False
    config.loss.global_kind = "softmax"
    return config


def open_clip_cfg(config) -> dict:
    """open_clip's model config (``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}``, as
    its model-config JSON files hold it) of the towers of our ``config``: CLIP text tower,
    cls-pooled ViT with a linear patch embedding.

    Raises:
      ValueError: the config's text tower is not CLIP's, or its patch stem not linear.
    """
    from region_medclip.models import text as text_lib
    from region_medclip.models import vit

    image = {**vit.decode_variant(config.model.image["variant"]), **dict(config.model.image)}
    text = dict(config.model.text)
    if text.get("kind", "clip") != "clip":
        raise ValueError("bench compare needs config.model.text.kind='clip' (open_clip's tower)")
    if image.get("stem", "patch") != "patch":
        raise ValueError("bench compare needs config.model.image.stem='patch' (open_clip's)")
    width, depth, mlp_dim, heads = text_lib.CLIP_TEXT_VARIANTS[text["variant"]]
    text = {**dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads), **text}
    vision_cfg = dict(
        layers=image["depth"],
        width=image["width"],
        head_width=image["width"] // image["heads"],
        mlp_ratio=image["mlp_dim"] / image["width"],
        patch_size=image["patch"],
        image_size=config.data.image_size,
    )
    text_cfg = dict(
        context_length=config.data.text_len,
        vocab_size=text["vocab_size"],
        width=text["width"],
        heads=text["heads"],
        layers=text["depth"],
        mlp_ratio=text["mlp_dim"] / text["width"],
    )
    quick = image.get("act", "gelu") == "quick_gelu"
    return dict(
        embed_dim=config.model.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick
    )


def open_clip_model(config):
    """An open_clip ``CLIP`` with the towers of our ``config`` (:func:`open_clip_cfg`; built from
    a config dict, nothing downloaded)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = open_clip_cfg(config)
    return open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=cfg["quick_gelu"],
    )


def measure_open_clip(config, *, steps: int, threads: int) -> dict:
    """Median seconds of an open_clip train step (forward, ClipLoss, backward, AdamW) at
    ``config.data.batch_size`` with ``config``'s shapes; and its parameter count."""
    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    loss_fn = open_clip.loss.ClipLoss()
    batch, size = config.data.batch_size, config.data.image_size
    images = torch.randn(batch, 3, size, size)
    vocab = model.vocab_size
    texts = torch.randint(1, vocab - 1, (batch, config.data.text_len))
    texts[:, -1] = vocab - 1  # an end-of-text token (the highest id) to pool at

    def step():
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()  # warm-up: allocator and oneDNN kernel selection
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(step_s=statistics.median(times), params=sum(p.numel() for p in model.parameters()))


def our_params(config) -> int:
    """Parameter count of our image + text towers and temperature (the region head, the box
    head and the sigmoid bias, which open_clip's CLIP has no counterpart of, left out)."""
    model = clip.from_config(config.model)
    size = config.data.image_size
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            np.zeros((1, size, size, 3), np.float32),
            np.zeros((1, config.data.text_len), np.int32),
            np.zeros((1, 1, 4), np.float32),
        )
    )["params"]
    left_out = ("region_tower", "box_tower", "logit_bias")
    kept = {k: v for k, v in shapes.items() if k not in left_out}
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(kept)))


def compare_case(name: str, config, *, steps: int, peak: float) -> dict:
    """One row: both sides' examples/s, their ratio, our MFU; and our region-aware step."""
    device = jax.devices()[0]
    ours = train_bench.measure_step(global_only(config), steps=steps, device=device)
    region = train_bench.measure_step(config, steps=steps, device=device)
    theirs = measure_open_clip(config, steps=steps, threads=os.cpu_count() or 1)
    batch = config.data.batch_size
    theirs_rate = batch / theirs["step_s"]
    return dict(
        case=name,
        batch=batch,
        image_size=config.data.image_size,
        text_len=config.data.text_len,
        params_region_medclip=our_params(config),
        params_open_clip=theirs["params"],
        region_medclip_examples_per_s=ours["examples_per_s"],
        open_clip_examples_per_s=round(theirs_rate, 2),
        ratio=round(ours["examples_per_s"] / theirs_rate, 3),
        mfu=round(ours["achieved_gflops"] * 1e9 / peak, 3),
        step_gflop=ours["step_gflop"],
        region_aware_examples_per_s=region["examples_per_s"],
        region_aware_mfu=round(region["achieved_gflops"] * 1e9 / peak, 3),
    )


def _case_configs(args) -> dict:
    """name -> config of each ``--compare_cases`` case, at ``--compare_batch`` where given."""
    configs = common.load_cases(args, args.compare_cases, "--compare_cases", cases=CASES)
    if "tiny_roi" in configs:
        # open_clip's architecture on both sides: its linear patch embedding and class token.
        configs["tiny_roi"].model.image.pool = "cls"
        configs["tiny_roi"].model.image.stem = "patch"
    for config in configs.values():
        if args.compare_batch:
            config.data.batch_size = args.compare_batch
    return configs


def run(args) -> tuple[dict, str]:
    """examples/s of the same CLIP step in region-medclip and open_clip, their ratio and our MFU,
    for the tiny and ViT-B/16 configs: (results for the JSON, the markdown report)."""
    configs = _case_configs(args)
    peak = common.matmul_peak(jax.devices()[0])
    rows = []
    for name, config in configs.items():
        rows.append(compare_case(name, config, steps=args.train_steps, peak=peak))
        print(rows[-1], flush=True)
    columns = ["case", "batch", "region_medclip_examples_per_s", "open_clip_examples_per_s"]
    columns += ["ratio", "mfu", "region_aware_examples_per_s", "params_region_medclip"]
    columns += ["params_open_clip"]
    machine = dict(
        platform=common.host()["platform"],
        processor=common.cpu_model(),
        cpus=os.cpu_count(),
        peak_gflops=round(peak / 1e9, 1),
    )
    report = f"{machine}\n" + common.markdown(rows, columns)
    return dict(machine=machine, rows=rows), report
