"""One training step: forward, the sharded loss, gradient accumulation and the guarded update.

The model runs under ``jax.jit`` with explicit shardings (GSPMD partitions it from the param and
batch layouts); the losses run inside ``jax.shard_map`` over the batch axes, where each device
holds its local shard and the losses' own collectives assemble the global-batch loss.
"""

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from region_medclip import losses
from region_medclip import sharding as sharding_lib
from region_medclip.models import boxes as boxes_lib
from region_medclip.models import clip
from region_medclip.models import text as text_lib
from region_medclip.models.region import patch_boxes
from region_medclip.models.teacher import concept_embeddings
from region_medclip.train import state as state_lib

# Batch keys the loss reads besides the embeddings.
_LOSS_BATCH_KEYS = (
    "roi_mask",
    "cap_ids",
    "neg_mask",
    "labels",
    "report_neg_mask",
    "has_image",
    "has_text",
)


def _apply(model, params, method, *args):
    return model.apply({"params": params}, *args, method=method)


def forward(model, params, batch, loss_config) -> dict[str, jax.Array]:
    """Model outputs ``total_loss`` needs: ``zimg, ztxt [n, D]``, ``zroi [n, R, D]``, ``zcap
    [n, R, D]`` (β or γ > 0), ``zneg [n, R, K, D]`` (γ > 0), ``logit_scale``, ``logit_bias``, from
    ``images [n, S, S, 3]``, ``texts [n, L]``, ``boxes [n, R, 4]``, ``roi_mask [n, R]``,
    ``captions [n, R, Lc]`` and ``negatives [n, R, K, Lc]``. Captions and negatives go through
    the text tower in one call. With ``report_negatives [n, Kr, L]`` in the batch also ``zrneg
    [n, Kr, D]``, the hard-negative reports of the softmax global loss; with a local weight > 0
    ``zwords [n, L, D]`` and ``zpatch [n, g², D]`` (:func:`local_features`)."""
    out = model.apply(
        {"params": params}, batch["images"], batch["texts"], batch["boxes"], batch["roi_mask"]
    )
    patch_tokens = out.pop("patch_tokens")
    if loss_config.get("local_weight", 0.0) > 0:
        out.update(local_features(model, params, batch["texts"], patch_tokens, loss_config))
    if loss_config.beta > 0 or loss_config.gamma > 0:
        if loss_config.gamma > 0:
            tokens = jnp.concatenate([batch["captions"][:, :, None], batch["negatives"]], axis=2)
            z = _apply(model, params, clip.RegionCLIP.encode_text, tokens)  # [n, R, 1 + K, D]
            out["zcap"], out["zneg"] = z[:, :, 0], z[:, :, 1:]
        else:
            out["zcap"] = _apply(model, params, clip.RegionCLIP.encode_text, batch["captions"])
    if "report_negatives" in batch:  # [n, Kr, L] → [n, Kr, D]
        out["zrneg"] = _apply(model, params, clip.RegionCLIP.encode_text, batch["report_negatives"])
    return out


def local_features(model, params, texts, patch_tokens, loss_config) -> dict[str, jax.Array]:
    """GLoRIA's two sides: ``zwords [n, L, D]``, every token of ``texts [n, L]`` through the text
    tower's projection, and ``zpatch [n, g², D]``, the region head on each cell of a g × g grid
    over ``patch_tokens [n, h, w, width]`` (g = ``loss.gloria.grid``, or h when 0), as the
    grounding evaluators embed patches. Both L2-normalised."""
    grid = loss_config.gloria.get("grid", 0) or patch_tokens.shape[1]
    cells = jnp.asarray(patch_boxes(grid))
    cells = jnp.broadcast_to(cells, (patch_tokens.shape[0], *cells.shape))
    return dict(
        zwords=_apply(model, params, clip.RegionCLIP.encode_words, texts),
        zpatch=_apply(model, params, clip.RegionCLIP.encode_regions, patch_tokens, cells, None),
    )


def word_mask(config, texts: jax.Array) -> jax.Array:
    """``[n, L]`` bool, the tokens of ``texts [n, L]`` that GLoRIA's local loss counts as words:
    neither padding (the text tower's ``pad_id``) nor the start and end tokens. Those two stand
    for the whole report, not a word: CLIP pools at the end token and BERT at ``[CLS]``, and the
    global term already aligns them; CLIP's start token, causal, is the same for every report."""
    return text_lib.word_mask(texts, config.model.text.get("pad_id", 0))


def box_targets(batch, cells: int) -> dict[str, jax.Array]:
    """The box loss's ``box_targets [n, K, 4]`` and ``box_positive [n, K]``: the finding boxes
    of ``batch`` (``boxes``, ``roi_mask``, ``box_finding``) assigned to the ``K = g²`` cells of
    the (square) patch grid (:func:`models.boxes.assign`)."""
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise ValueError(f"the box head's {cells} cells are not a square patch grid")
    finding = jnp.asarray(batch["roi_mask"], bool) & jnp.asarray(batch["box_finding"], bool)
    targets, positive = boxes_lib.assign(batch["boxes"], finding, grid, grid)
    return dict(box_targets=targets, box_positive=positive)


def sharded_total_loss(mesh: Mesh, loss_config, **kwargs):
    """``losses.total_loss`` over the global batch, run per device inside ``jax.shard_map``
    (its specs split every non-scalar over the batch axes of :mod:`region_medclip.sharding`)."""
    axes = sharding_lib.BATCH_AXES

    def spec(x):
        return P() if jnp.ndim(x) == 0 else sharding_lib.logical_spec(("batch",), mesh)

    def local(out, batch, student, teacher):
        return losses.total_loss(
            out=out,
            batch=batch,
            loss_config=loss_config,
            student_logits=student,
            teacher_logits=teacher,
            axis_name=axes,
        )

    args = (kwargs["out"], kwargs["batch"], kwargs["student_logits"], kwargs["teacher_logits"])
    fn = jax.shard_map(local, mesh=mesh, in_specs=jax.tree.map(spec, args), out_specs=(P(), P()))
    return fn(*args)


def make_loss_fn(model, config, mesh: Mesh, teacher=None) -> Callable:
    """``loss_fn(params, batch, teacher_params) → (loss, metrics)`` of the global batch."""

    def loss_fn(params, batch, teacher_params):
        out = forward(model, params, batch, config.loss)
        return batch_loss(model, config, mesh, teacher, out, params, batch, teacher_params)

    return loss_fn


def batch_loss(model, config, mesh: Mesh, teacher, out, params, batch, teacher_params):
    """``(loss, metrics)`` of the model outputs ``out`` (:func:`forward`) of ``batch``; ``params``
    and ``teacher_params`` serve the distillation term only."""
    loss_config = config.loss
    loss_batch = {k: batch[k] for k in _LOSS_BATCH_KEYS if k in batch}
    # Uncertain (−1) findings count as absent in the label-similarity loss (U-zeros).
    loss_batch["labels"] = jnp.maximum(batch["labels"], 0.0)
    if loss_config.get("local_weight", 0.0) > 0:
        loss_batch["word_mask"] = word_mask(config, batch["texts"])
    if loss_config.get("box_weight", 0.0) > 0:
        loss_batch.update(box_targets(batch, out["proposals"].shape[1]))
    student_logits = teacher_logits = None
    if teacher is not None and loss_config.lambda_ > 0:
        temperature = config.teacher.temperature
        concepts = concept_embeddings(model, params, teacher.concept_tokens)
        student_logits = jnp.einsum("nrd,cd->nrc", out["zroi"], concepts) / temperature
        teacher_logits = teacher.logits(
            teacher_params, batch["images"], batch["boxes"], batch["roi_mask"], temperature
        )
    return sharded_total_loss(
        mesh,
        loss_config,
        out=out,
        batch=loss_batch,
        student_logits=student_logits,
        teacher_logits=teacher_logits,
    )


def _split(x: jax.Array, accum: int) -> jax.Array:
    """``[n, ...] → [accum, n / accum, ...]``, micro-batch j taking rows j, j + accum, ...: each
    keeps the batch's layout over devices (every device holds ``1 / accum`` of its rows)."""
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)


def _unsplit(x: jax.Array) -> jax.Array:
    """The inverse of :func:`_split`: ``[accum, m, ...] → [accum · m, ...]`` in batch order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_gradients_fn(loss_fn: Callable, accum: int, batch_sharding) -> Callable:
    """``gradients(params, batch, teacher_params) → (loss, metrics, grads)``, averaged over
    ``accum`` micro-batches, each with its own negatives only (``train.accum_negatives=micro``;
    :func:`make_cached_gradients_fn` keeps the whole batch's)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch, teacher_params):
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, teacher_params)
            return loss, metrics, grads

        def body(carry, micro):
            micro = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), micro
            )
            (loss, metrics), grads = grad_fn(params, micro, teacher_params)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        micro = jax.tree.map(lambda x: _split(x, accum), batch)
        zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), teacher_params)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1])
        )
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

    return gradients


def make_cached_gradients_fn(
    embed: Callable, loss_of: Callable, accum: int, batch_sharding
) -> Callable:
    """Gradient accumulation that keeps the global batch's negatives (GradCache, Gao et al.
    2021; open_clip's ``accum_freq``): ``gradients(params, batch, teacher_params) → (loss,
    metrics, grads)`` equal to the full batch's, with the activations of one micro-batch live.

    1. ``embed(params, micro) → out`` runs on each of ``accum`` micro-batches without gradients;
       their embeddings are put back in batch order (a few KiB a row).
    2. ``loss_of(out, params, batch, teacher_params) → (loss, metrics)`` over the whole batch,
       and its gradient with respect to every embedding (and to ``params`` directly, which only
       the distillation term's concept embeddings use).
    3. Each micro-batch runs again with gradients, its embeddings' cotangents taken from step 2
       (a VJP); the param gradients add up to the full batch's. The scalars every micro-batch
       returns (``logit_scale``, ``logit_bias``) get ``1 / accum`` of theirs each time.
    """

    def constrain(tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)

    def gradients(params, batch, teacher_params):
        micro = jax.tree.map(lambda x: _split(x, accum), batch)
        outs = jax.lax.map(lambda m: embed(jax.lax.stop_gradient(params), constrain(m)), micro)
        # Scalars come back once per micro-batch ([accum]); embeddings [accum, n / accum, ...].
        full = {k: v[0] if v.ndim == 1 else constrain(_unsplit(v)) for k, v in outs.items()}
        (loss, metrics), (cotangent, direct) = jax.value_and_grad(
            lambda o, p: loss_of(o, p, batch, teacher_params), argnums=(0, 1), has_aux=True
        )(full, params)
        cotangents = {
            k: jnp.broadcast_to(v / accum, (accum,)) if v.ndim == 0 else _split(v, accum)
            for k, v in cotangent.items()
        }

        def replay(grads, item):
            m, ct = item
            _, vjp = jax.vjp(lambda p: embed(p, constrain(m)), params)
            return jax.tree.map(jnp.add, grads, vjp(ct)[0]), None

        grads, _ = jax.lax.scan(replay, direct, (micro, cotangents))
        return loss, metrics, grads

    return gradients


def step_gradients(model, config, mesh: Mesh, teacher=None) -> Callable:
    """``gradients(params, batch, teacher_params) → (loss, metrics, grads)`` of a train step,
    over ``config.train.grad_accum`` micro-batches that meet the whole batch's negatives
    (``train.accum_negatives=global``) or only their own (``micro``)."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    accum = int(config.train.grad_accum)
    if accum > 1 and config.train.get("accum_negatives", "global") == "global":
        return make_cached_gradients_fn(
            lambda params, micro: forward(model, params, micro, config.loss),
            functools.partial(batch_loss, model, config, mesh, teacher),
            accum,
            batch_sharding,
        )
    return make_gradients_fn(make_loss_fn(model, config, mesh, teacher), accum, batch_sharding)


def _fingerprint(texts: jax.Array) -> jax.Array:
    """A fingerprint of a batch's report tokens: equal data order ⇔ equal sequences of these."""
    texts = texts.astype(jnp.uint32)
    weights = jnp.arange(1, texts.size + 1, dtype=jnp.uint32).reshape(texts.shape)
    return jnp.sum(texts * weights)


def _guarded_update(
    state: state_lib.TrainState, loss, grads, tx, clamp: bool, ema_decay: float = 0.0
):
    """The optimizer update of ``state`` by ``grads`` (and of the params' moving average, when
    the state keeps one), kept only if ``loss`` and the gradient norm are finite (a non-finite
    step is counted in ``skipped`` / ``bad_streak``); returns the new state and ``grad_norm``,
    ``skipped_steps``, ``bad_streak``, ``nonfinite``."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if clamp:
        params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, math.log(100))}
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    bad = (~ok).astype(jnp.int32)
    ema = state.ema
    if ema is not None:
        ema = keep(state_lib.ema_update(ema, params, state.step, ema_decay), ema)
    new_state = state.replace(
        ema=ema,
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=jax.random.fold_in(state.rng, state.step),
        skipped=state.skipped + bad,
        bad_streak=(state.bad_streak + bad) * bad,
    )
    metrics = {
        "grad_norm": grad_norm,
        "skipped_steps": new_state.skipped,
        "bad_streak": new_state.bad_streak,
        "nonfinite": bad,
    }
    return new_state, metrics


def make_train_step(
    *,
    model: clip.RegionCLIP,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_sharding,
    teacher=None,
    max_traces: int | None = None,
) -> Callable:
    """The jitted ``train_step(state, batch, teacher_params) → (state, metrics)``.

    The state is donated. A step whose loss or gradient is not finite leaves params and optimizer
    state unchanged and counts itself in ``state.skipped`` / ``state.bad_streak``. The step runs
    with ``mesh`` as the ambient mesh (``sharding.with_logical_rules``), so the modules'
    activation annotations (``batch``, ``length``, ...) constrain the layout GSPMD gives them
    under the one rules table. With ``max_traces``, tracing the step more often than that raises
    (``chex.assert_max_traces``): a retrace between steps would recompile the whole model.
    """
    clamp = config.loss.global_kind != "sigmoid"  # softmax-style scale clamped to [0, log 100]
    ema_decay = float(config.train.get("ema_decay", 0.0))
    batch_sharding = sharding_lib.batch_sharding(mesh)
    gradients = step_gradients(model, config, mesh, teacher)

    def train_step(state: state_lib.TrainState, batch, teacher_params):
        loss, metrics, grads = gradients(state.params, batch, teacher_params)
        new_state, update_metrics = _guarded_update(state, loss, grads, tx, clamp, ema_decay)
        metrics = {
            **metrics,
            **update_metrics,
            "lr": lr_fn(state.step),
            "data/fingerprint": _fingerprint(batch["texts"]),
        }
        return new_state, metrics

    if max_traces is not None:
        train_step = chex.assert_max_traces(train_step, n=max_traces)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding, sharding_lib.replicated(mesh)),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    return sharding_lib.with_logical_rules(jitted, mesh)
