"""CoOp: learned prompt context with both towers frozen (``train/coop.py``), saved beside a run
and scored by the zero-shot evaluator and ``load(W).zero_shot(prompts="coop")``."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import pytest
from flax import linen as nn

from region_medclip import checkpointing
from region_medclip.data import registry as data_registry
from region_medclip.data import tokenizers
from region_medclip.evaluators import common, zero_shot
from region_medclip.evaluators import coop as coop_lib
from region_medclip.models import clip
from region_medclip.train import coop

FINDINGS = ["nodule", "mass", "pleural effusion"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def micro(synth_data_dir, tmp_path_factory) -> dict:
    """The micro config's model, initialised and saved as a workdir ``load`` reads."""
    c = micro_config.get_config(f"data_dir={synth_data_dir}")
    c.evals.zero_shot = dict(kind="zero_shot", batch_size=8, bootstrap=0)
    module = clip.from_config(c.model)
    inputs = [jnp.zeros(x.shape, x.dtype) for x in clip.example_inputs(c.data).values()]
    params = jax.device_get(
        nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *inputs)["params"])
    )
    workdir = str(tmp_path_factory.mktemp("coop") / "run")
    checkpointing.save_params(workdir, params, json.loads(c.to_json_best_effort()))
    tokenizer = tokenizers.from_config(c.data)
    return dict(config=c, module=module, params=params, workdir=workdir, tokenizer=tokenizer)


def _toy(n_per_class=6, dim=32, seed=0):
    """A separable multi-label set: images ``[n, dim]`` pointing along their findings'
    directions (normal studies along none), ``labels [n, 1 + F]`` with "no finding" first."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n_per_class * (1 + len(FINDINGS)), 1 + len(FINDINGS)), np.float32)
    labels[np.arange(len(labels)), np.arange(len(labels)) % labels.shape[1]] = 1
    zimg = 0.3 * rng.normal(size=(len(labels), dim)) + 2.0 * np.pad(
        labels[:, 1:], ((0, 0), (0, dim - 3))
    )
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    return zimg.astype(np.float32), labels, ["no finding", *FINDINGS]


@pytest.mark.parametrize("position", ["end", "middle"])
def test_prompt_tokens_put_the_class_name_among_the_context(position):
    tokenizer = tokenizers.synth_bpe()
    tokens, slots = coop_lib.prompt_tokens(
        tokenizer, FINDINGS, n_ctx=4, position=position, length=16
    )
    assert tokens.shape == (3, 16) and slots.shape == (3, 4)
    name = coop_lib.word_ids(tokenizer, "pleural effusion")
    dot = coop_lib.word_ids(tokenizer, ".", space=False)
    row = tokens[2]
    if position == "end":  # BOS, [V]1..[V]4, the class, ".", EOS
        np.testing.assert_array_equal(slots[2], [1, 2, 3, 4])
        expected = [tokenizer.bos_id, *[tokenizer.bos_id] * 4, *name, *dot, tokenizer.eos_id]
    else:  # BOS, [V]1 [V]2, the class, [V]3 [V]4, ".", EOS
        after = 3 + len(name)
        np.testing.assert_array_equal(slots[2], [1, 2, after, after + 1])
        expected = [tokenizer.bos_id] * 3 + name + [tokenizer.bos_id] * 2 + dot
        expected += [tokenizer.eos_id]
    np.testing.assert_array_equal(row[: len(expected)], expected)
    assert (row[len(expected) :] == tokenizer.pad_id).all()
    # The same words as in a hand prompt: the class name reads as it does mid-sentence.
    hand = [int(i) for i in tokenizer(["There is pleural effusion."], 16)[0]]
    start = hand.index(name[0])
    assert hand[start : start + len(name) + len(dot)] == name + dot
    with pytest.raises(ValueError, match="n_ctx=12, longer than the text length 16"):
        coop_lib.prompt_tokens(tokenizer, FINDINGS, n_ctx=12, position=position, length=16)


def test_context_vectors_land_on_their_slots():
    context = jnp.arange(2 * 1 * 2 * 3, dtype=jnp.float32).reshape(2, 1, 2, 3)
    slots = jnp.array([[1, 4], [2, 3]])
    mask, values = coop_lib.place_context(context, slots, 6)
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert values.shape == (2, 2, 6, 3)
    np.testing.assert_array_equal(values[1, 0, 4], context[1, 0, 1])
    np.testing.assert_array_equal(values[0, 1, 2], context[0, 0, 0])
    assert not np.asarray(values)[:, ~np.asarray(mask)].any()


def test_gradients_reach_only_the_context(micro):
    module, params, tokenizer = micro["module"], micro["params"], micro["tokenizer"]
    tokens, slots = coop_lib.prompt_tokens(tokenizer, FINDINGS, n_ctx=4, position="end", length=32)
    context = coop.init_context(jax.random.key(0), sets=2, groups=3, n_ctx=4, width=64)
    zimg, labels, _ = _toy()
    targets = np.full((len(zimg), 3), -1.0, np.float32)
    targets[:, 0] = labels[:, 1]  # only the first finding is known

    def loss(ctx, p):
        return coop.coop_loss(
            ctx,
            encode_fn=lambda c: coop_lib.encode(module, p, c, tokens, slots),
            zimg=zimg,
            targets=targets,
            weights=np.ones(len(zimg), np.float32),
            logit_scale=10.0,
            task="multilabel",
        )

    grads = np.asarray(jax.jit(jax.grad(loss))(context, params))
    assert grads.shape == context.shape
    assert np.abs(grads[:, 0]).sum() > 0  # both sets of the known finding's context
    np.testing.assert_array_equal(grads[:, 1:], 0.0)  # the other classes' contexts: none
    # The placeholders' own id is inert: the context replaces its embedding, so another id
    # encodes the same and its table row gets no gradient.
    other = np.where(np.asarray(coop_lib.place_context(context, slots, 32)[0]), 97, tokens)
    encode = jax.jit(lambda t: coop_lib.encode(module, params, context, t, slots))
    np.testing.assert_allclose(encode(other), encode(tokens), atol=1e-6)
    assert not (tokens == 97).any()

    def loss_other(p):
        return jnp.sum(coop_lib.encode(module, p, context, other, slots))

    table = jax.jit(jax.grad(loss_other))(params)["text_tower"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(np.asarray(table)[97], 0.0)
    assert np.abs(np.asarray(table)[tokens[0, 5]]).sum() > 0  # the class name's first token


def test_training_lowers_the_loss_and_leaves_the_towers_alone(micro):
    module, params, tokenizer = micro["module"], micro["params"], micro["tokenizer"]
    before = jax.tree.map(np.array, params)  # copies
    zimg, labels, names = _toy()
    options = coop.Options(n_ctx=4, task="multilabel", steps=100)  # CoOp's learning rate
    learner = coop.PromptLearner(module, params, tokenizer, text_len=32, options=options)
    learned, losses = learner.train(
        zimg=zimg, labels=labels, class_names=names, logit_scale=10.0, shots=4, seed=0
    )
    assert losses[-1] < 0.2 * losses[0]
    assert learned.class_names == tuple(FINDINGS) and learned.context.shape == (2, 1, 4, 64)
    assert learned.options["train_examples"] == 16 and learned.shots == 4
    jax.tree.map(np.testing.assert_array_equal, params, before)  # every leaf, bit for bit
    # The learned prompts rank the images they learned from by their findings.
    rows, *_ = coop.shot_set(labels, names, shots=4, seed=0, task="multilabel")
    probs, findings, zcls = zero_shot.learned_probabilities(
        zimg=zimg[rows],
        class_names=names,
        learned=learned,
        encode_learned=coop_lib.Encoder(module, params, tokenizer, 32),
        encode=None,
        logit_scale=10.0,
    )
    assert findings == [1, 2, 3] and zcls is None
    assert common.per_class_auroc(probs, labels[rows, 1:]).min() > 0.9


def test_unified_class_specific_and_phrase_contexts(micro):
    module, params, tokenizer = micro["module"], micro["params"], micro["tokenizer"]
    zimg, labels, names = _toy()
    shapes = {}
    for class_specific in (False, True):
        options = coop.Options(n_ctx=4, class_specific=class_specific, task="auto", steps=1)
        learner = coop.PromptLearner(module, params, tokenizer, text_len=32, options=options)
        learned, _ = learner.train(
            zimg=zimg, labels=labels, class_names=names, logit_scale=10.0, shots=2, seed=1
        )
        shapes[class_specific] = learned.context.shape
        # One label an image: CoOp's softmax over every class, one set of context.
        assert learned.task == "multiclass" and learned.class_names == tuple(names)
    assert shapes == {False: (1, 1, 4, 64), True: (1, 4, 4, 64)}
    phrase = coop.phrase_context(params, tokenizer, "there is")
    ids = coop_lib.word_ids(tokenizer, "there is", space=False)
    np.testing.assert_array_equal(phrase, coop.token_table(params)[ids])
    start = coop.init_context(None, sets=2, groups=3, n_ctx=len(ids), width=64, phrase=phrase)
    np.testing.assert_array_equal(start[1, 2], phrase)
    drawn = coop.init_context(jax.random.key(0), sets=1, groups=1, n_ctx=512, width=64)
    assert abs(float(jnp.std(drawn)) - 0.02) < 1e-3
    with pytest.raises(ValueError, match="coop position: 'front'"):
        coop.Options(position="front").check()


def test_multiclass_prompts_score_the_softmax_over_their_classes():
    names = ["no finding", "nodule", "mass"]
    z = np.eye(3, 4)[None]  # [S=1, C=3, D=4]
    learned = coop_lib.LearnedPrompts(np.zeros((1, 1, 2, 8)), tuple(names), task="multiclass")
    zimg = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    probs, findings, zcls = zero_shot.learned_probabilities(
        zimg=zimg,
        class_names=["mass", "nodule"],
        learned=learned,
        encode_learned=lambda _: z,
        encode=None,
        logit_scale=2.0,
    )
    softmax = np.exp(2 * zimg @ z[0].T) / np.exp(2 * zimg @ z[0].T).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, softmax[:, [2, 1]])
    np.testing.assert_array_equal(zcls, z[0][[2, 1]])
    with pytest.raises(ValueError, match=r"no prompt for \['edema'\]"):
        zero_shot.learned_probabilities(
            zimg=zimg,
            class_names=["edema"],
            learned=learned,
            encode_learned=lambda _: z,
            encode=None,
            logit_scale=2.0,
        )


def _random_prompts(seed=0, negatives="learned") -> coop_lib.LearnedPrompts:
    context = 0.5 * np.random.default_rng(seed).normal(size=(2, 7, 4, 64)).astype(np.float32)
    names = tuple(data_registry.get("synth_cxr").class_names()[1:])
    return coop_lib.LearnedPrompts(
        context=context,
        class_names=names,
        position="middle",
        negatives=negatives,
        dataset="synth_cxr",
        shots=4,
        seed=seed,
        options=dict(steps=3, final_loss=0.5),
    )


def test_learned_prompts_round_trip_through_a_file(micro, tmp_path):
    prompts = _random_prompts()
    where = coop_lib.path(str(tmp_path), "synth_cxr", "4shot_seed0")
    coop_lib.save(where, prompts)
    back = coop_lib.load(where)
    np.testing.assert_array_equal(back.context, prompts.context)
    assert {**vars(back), "context": None} == {**vars(prompts), "context": None}
    assert back.n_ctx == 4 and back.class_specific
    encoder = coop_lib.Encoder(micro["module"], micro["params"], micro["tokenizer"], 32)
    np.testing.assert_array_equal(encoder(back), encoder(prompts))
    coop_lib.save(coop_lib.path(str(tmp_path), "synth_cxr", "8shot_seed1"), _random_prompts(1))
    assert [(p.shots, p.seed) for p in coop_lib.saved(str(tmp_path), "synth_cxr")] == [
        (4, 0),
        (4, 1),
    ]
    with pytest.raises(FileNotFoundError, match="python -m region_medclip.coop"):
        coop_lib.load(str(tmp_path / "nope.npz"))


def test_the_evaluator_and_the_api_score_with_the_learned_prompts(micro):
    import region_medclip
    from region_medclip.evaluators import run

    workdir = micro["workdir"]
    where = coop_lib.path(workdir, "synth_cxr", "4shot_seed0")
    coop_lib.save(where, _random_prompts())
    config = micro["config"].copy_and_resolve_references()
    config.evals.coop = dict(config.evals.zero_shot.to_dict(), coop=where)
    results = run.evaluate(config, micro["module"], micro["params"])
    hand, learned = results["zero_shot"], results["coop"]
    assert np.isfinite(learned["macro_auroc"]) and "top1" not in learned
    assert learned["macro_auroc"] != hand["macro_auroc"]

    model = region_medclip.load(workdir)
    source = data_registry.get("synth_cxr").data_source("test", model.config.data)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.stack([source[i]["labels"] for i in range(len(source))])
    probs = model.zero_shot(images, prompts="coop")  # the most shots saved: the only file
    assert probs.shape == (len(images), 7)
    per_class = common.per_class_auroc(probs, labels[:, 1:])
    names = data_registry.get("synth_cxr").class_names()[1:]
    for name, value in zip(names, per_class, strict=True):
        np.testing.assert_allclose(value, learned[f"auroc/{name}"], atol=1e-6)
    np.testing.assert_allclose(common.macro_auroc(probs, labels[:, 1:]), learned["macro_auroc"])
    np.testing.assert_array_equal(model.zero_shot(images, prompts="coop", coop=where), probs)
    by_name = model.zero_shot(images[:2], ["mass"], prompts="coop", coop="4shot_seed0")
    np.testing.assert_allclose(by_name, probs[:2, 1:2], atol=1e-6)
    assert not np.allclose(model.zero_shot(images), probs)  # the default is unchanged
    with pytest.raises(FileNotFoundError, match="no learned prompts for 'chexpert'"):
        model.zero_shot(images, prompts="coop", dataset="chexpert")


@pytest.mark.slow
def test_the_coop_cli_writes_prompts_and_the_table(micro):
    workdir = micro["workdir"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=micro_config.xla_flags(1))
    flags = ["--shots=1,2", "--seeds=0", "--steps=5", "--n_ctx=4", "--position=middle"]
    proc = subprocess.run(
        [sys.executable, "-m", "region_medclip.coop", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = os.path.join(workdir, "coop", "synth_cxr")
    table = open(os.path.join(folder, "table.md")).read()
    assert table.strip() in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2"]
    saved = json.load(open(os.path.join(folder, "table.json")))
    assert [(r["shots"], r["seed"]) for r in saved["runs"]] == [(1, 0), (2, 0)]
    assert saved["options"]["hand"] == dict(
        dataset="synth_cxr", prompts="templates", negatives="prompts"
    )
    learned = coop_lib.load(os.path.join(folder, "2shot_seed0.npz"))
    assert learned.position == "middle" and learned.n_ctx == 4 and learned.options["steps"] == 5
