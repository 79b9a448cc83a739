"""Runs the evaluators named in ``config.evals`` on a model's params.

``config.evals.<name> = dict(kind=..., every=..., split="test", max_examples=0, ...)`` with a kind
of the evaluator registry (``registry.KINDS``: ``zero_shot`` | ``retrieval`` | ``regions`` |
``grounding`` | ``modality_gap``) and that kind's options. Evaluators on the same split share one
embedding pass. Results go to ``workdir/eval/<step>.json`` (one file per step, all evaluators),
TensorBoard (``eval/<name>/<metric>``) and a printed table.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from region_medclip.data import registry as data_registry
from region_medclip.evaluators import embeddings as embeddings_lib
from region_medclip.evaluators import registry
from region_medclip.evaluators.registry import eval_config

__all__ = ["dataset_config", "eval_config", "evaluate", "patch_grid", "table", "write"]


def patch_grid(model, config) -> int:
    """Side of the image tower's patch grid at ``config.data.image_size``."""
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def patches(module, x):
        return module.encode_image(x)[1]

    shapes = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.PRNGKey(0),
            jnp.zeros(images.shape),
            method=patches,
        )[0]
    )
    return int(shapes.shape[1])


def evaluate(
    config, model, params, names: list[str] | None = None, plot_dir: str | None = None
) -> dict[str, dict]:
    """Runs the evaluators ``names`` (default: all of ``config.evals``); returns their metrics,
    ``{name: {metric: float}}``, each with ``examples`` (the N of its split). Each evaluates
    its own ``dataset`` (default ``config.data.eval``); evaluators on the same dataset and split
    share one embedding pass. With ``plot_dir``, each evaluator also saves its plot there as
    ``<name>.png``."""
    names = list(config.evals) if names is None else names
    if not names:
        return {}
    text = registry.TextTower(model, params, config.data)
    grid = patch_grid(model, config)
    cache: dict[tuple, dict] = {}
    results = {}
    for name in names:
        cfg = eval_config(config, name)
        data_config = dataset_config(config, cfg["dataset"], name)

        def embed(split, max_examples, data_config=data_config, batch_size=cfg["batch_size"]):
            key = (data_config.eval, split, max_examples, batch_size)
            if key not in cache:
                cache[key] = embeddings_lib.embed_split(
                    model,
                    params,
                    data_config,
                    split=split,
                    batch_size=batch_size,
                    grid=grid,
                    max_examples=max_examples,
                )
            return cache[key]

        emb = embed(cfg["split"], cfg["max_examples"])
        ctx = registry.Context(
            dataset=data_registry.get(data_config.eval, data_config.get("data_dir")),
            text=text,
            grid=grid,
            split=cfg["split"],
            name=name,
            embed=embed,
            model=model,
            params=params,
            data_config=data_config,
        )
        evaluator, options = registry.KINDS[cfg["kind"]], registry.options(cfg)
        results[name] = {
            **evaluator.run(emb, ctx=ctx, **options),
            "examples": float(len(emb["zimg"])),
        }
        if plot_dir is not None:
            epath.Path(plot_dir).mkdir(parents=True, exist_ok=True)
            evaluator.plot(emb, str(epath.Path(plot_dir) / f"{name}.png"), ctx=ctx, **options)
    return results


def dataset_config(config, dataset: str | None, name: str = "*"):
    """``config.data`` with ``eval`` set to ``dataset`` (None: left as it is).

    Raises:
      KeyError: ``config.evals.<name>.dataset`` names neither a registered dataset nor one
        prepared in ``data.data_dir``.
    """
    data_config = config.data.copy_and_resolve_references()
    if dataset:
        try:
            data_registry.get(dataset, data_config.get("data_dir"))
        except KeyError as err:
            raise KeyError(f"config.evals.{name}.dataset: {err.args[0]}") from None
        with data_config.unlocked():
            data_config.eval = dataset
    return data_config


def write(workdir: str, step: int, results: dict[str, dict], tb=None, suffix: str = "") -> str:
    """Writes ``workdir/eval/<step><suffix>.json`` (and TensorBoard scalars); returns the table
    text."""
    path = epath.Path(workdir) / "eval"
    path.mkdir(parents=True, exist_ok=True)
    clean = {
        name: {k: (v if np.isfinite(v) else None) for k, v in out.items()}
        for name, out in results.items()
    }
    (path / f"{step}{suffix}.json").write_text(json.dumps({"step": step, **clean}, indent=2))
    if tb is not None:
        for name, out in clean.items():
            for key, value in out.items():
                if value is not None:
                    tb.add_scalar(f"eval/{name}/{key}", value, step)
    return table(step, results)


def table(step: int, results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers (bootstrap bounds and per-class rows left out)."""
    # The name column fits the longest evaluator name, so no name runs into its metric.
    width = max([14, *(len(name) + 2 for name in results)])
    lines = [f"evaluation at step {step}", f"{'evaluator':<{width}}{'metric':<28}{'value':>10}"]
    for name, out in results.items():
        for key, value in out.items():
            if "/ci_" in key or key.startswith("auroc/"):
                continue
            lines.append(f"{name:<{width}}{key:<28}{value:>10.4f}")
    return "\n".join(lines)
