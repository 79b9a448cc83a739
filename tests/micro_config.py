"""The smallest useful training config, for tests: 32 px films, μ-sized towers, 8 per batch.

python -m region_medclip.main --config=tests/micro_config.py:data_dir=/tmp/d --workdir=...
"""

import jax
import numpy as np

from region_medclip import config as config_lib
from region_medclip import sharding as sharding_lib
from region_medclip import train
from region_medclip.data import pipeline


def get_config(arg: str | None = None):
    """``arg``: ``data_dir=`` (where synth_cxr is built), ``steps=``, ``kind=`` global loss,
    ``evals`` (add every evaluator)."""
    args = config_lib.parse_arg(arg, data_dir="", steps=4, kind="softmax", evals=False)
    c = config_lib.base_config()
    c.model.image = dict(variant="mu/8", pool="cls")
    c.model.text = dict(kind="clip", variant="mu", vocab_size=1024, context_len=32)
    c.model.region = dict(roi_size=2, sampling_ratio=1, pool="mean", proj="shared")
    c.model.embed_dim = 32
    c.loss.global_kind = args.kind
    if args.kind == "sigmoid":
        c.model.logit_scale_init = config_lib.SIGMOID_LOGIT_SCALE_INIT
    c.loss.lambda_ = 0.0

    c.data.image_size = 32
    c.data.text_len = 32
    c.data.caption_len = 16
    c.data.tokenizer = "synth_bpe"
    c.data.data_dir = args.data_dir
    c.data.synth = dict(num=160, seed=0)
    c.data.batch_size = 8
    c.data.max_rois = 3
    c.data.num_negatives = 2

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.total_steps = args.steps
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.keep = 10
    if args.evals:  # every evaluator on 12 test films
        for kind in ("zero_shot", "retrieval", "regions", "grounding", "modality_gap"):
            c.evals[kind] = dict(kind=kind, every=2, max_examples=12, batch_size=8, bootstrap=20)
    return c


def random_batch(c, seed=0) -> dict[str, np.ndarray]:
    """A random global batch with the shapes of config ``c`` (ROIs partly masked)."""
    return pipeline.random_batch(c.data, c.data.batch_size, seed)


def step_setup(c, devices=None):
    """(mesh, train.Setup, fresh state) for config ``c``."""
    mesh = sharding_lib.make_mesh(c.mesh, devices)
    run = train.setup(c, mesh)
    return mesh, run, run.init_state(c.seed)


def run_steps(c, batches, devices=None, teacher=None):
    """Runs ``train_step`` on each (process-local) batch; returns (state, host metrics)."""
    mesh, run, state = step_setup(c, devices)
    step = run.train_step(c, mesh, teacher)
    teacher_params = teacher.params if teacher else {}
    history = []
    batch_sharding = sharding_lib.batch_sharding(mesh)
    for batch in batches:
        batch = {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()
        }
        state, metrics = step(state, batch, teacher_params)
        history.append({k: float(v.addressable_data(0)) for k, v in metrics.items()})
    return state, history
