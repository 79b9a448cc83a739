"""GLoRIA's local loss: sharded == dense (values and gradients on 8 devices), the NumPy
reference, hand cases, masked words that change nothing, no NaN."""

import jax
import jax.numpy as jnp
import losses_cases as lc
import numpy as np
import pytest
from losses_reference import np_gloria_local_loss

from region_medclip import losses

CASES = lc.CASE_GROUPS["local"]


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


@pytest.mark.parametrize("local_batch", lc.LOCAL_BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_dense(mesh, case, local_batch):
    lc.check_sharded_equals_dense(mesh, case, local_batch)


@pytest.mark.parametrize("case", lc.with_reference("local"))
def test_dense_equals_numpy_reference(case):
    lc.check_dense_equals_reference(case)


def test_numpy_reference_at_other_temperatures():
    """Each temperature reaches its own place in the equation (GLoRIA's three are 4, 5, 10)."""
    _, arrays, _, _ = lc.case_gloria_local(np.random.default_rng(8), 2)
    names = ("temperature1", "temperature2", "temperature3")
    for temperatures in [(1.0, 1.0, 1.0), (0.5, 3.0, 2.0), (8.0, 0.25, 20.0)]:
        static = dict(zip(names, temperatures, strict=True))
        loss, _ = lc.jit(losses.gloria_local_loss, **static)(**arrays)
        np.testing.assert_allclose(
            float(loss), np_gloria_local_loss(**arrays, **static), rtol=1e-5, err_msg=static
        )


@pytest.mark.parametrize("case", CASES)
def test_no_nan_with_identical_embeddings(case):
    lc.check_no_nan_with_identical_embeddings(case)


@pytest.mark.parametrize("scale", lc.EXTREME_SCALES)
@pytest.mark.parametrize("case", CASES)
def test_no_nan_at_extreme_temperatures(case, scale):
    lc.check_no_nan_at_extreme_logit_scale(case, scale)


def test_masked_words_change_nothing(mesh):
    """Padding, special tokens, whatever a masked slot holds (NaN too), and how many such slots
    there are: the loss and the gradients of the valid words are those of the valid words alone,
    and a masked slot gets exactly zero gradient."""
    rng = np.random.default_rng(9)
    loss_fn, arrays, static, diff = lc.case_gloria_local(rng, 2)
    mask = arrays["word_mask"]
    reference = lc.value_and_grad(loss_fn, arrays, static, diff)
    # Two more padded slots per report, and NaN behind every masked slot.
    zwords = np.concatenate([arrays["zwords"], lc.unit(rng, len(mask), 2, lc.DIM)], axis=1)
    mask = np.concatenate([mask, np.zeros((len(mask), 2), bool)], axis=1)
    zwords = np.where(mask[..., None], zwords, np.nan).astype(np.float32)
    padded = dict(arrays, zwords=zwords, word_mask=mask)
    for shard_mesh in (None, mesh):
        loss, metrics, grads = lc.value_and_grad(loss_fn, padded, static, diff, mesh=shard_mesh)
        lc.assert_close(loss, reference[0], "loss")
        lc.assert_close(metrics["words"], reference[1]["words"], "words")
        lc.assert_close(grads["zpatch"], reference[2]["zpatch"], "d loss / d zpatch")
        lc.assert_close(grads["zwords"][:, : lc.NUM_WORDS], reference[2]["zwords"], "d / d zwords")
        assert not np.any(np.asarray(grads["zwords"])[~mask]), "a masked word got a gradient"


def _eye(*rows):
    """Unit vectors e_i of the embedding space, stacked: float32 [len(rows), DIM]."""
    return np.eye(lc.DIM, dtype=np.float32)[list(rows)]


def test_local_similarity_by_hand():
    # One word e0 against patches e0, e1 with τ1 = log 3: attention (3/4, 1/4), so the context is
    # (3/4, 1/4) and its cosine with the word 3/√10. Against patches e2, e3 the word sees nothing:
    # uniform attention, a context orthogonal to it, cosine 0.
    zpatch = np.stack([_eye(0, 1), _eye(2, 3)])
    zwords = _eye(0)[None]
    z = losses.local_similarity(
        zpatch=zpatch,
        zwords=zwords,
        word_mask=np.ones((1, 1), bool),
        temperature1=np.log(3.0),
        temperature2=1.0,
    )
    np.testing.assert_allclose(np.asarray(z), [[3 / np.sqrt(10)], [0.0]], rtol=1e-6, atol=1e-7)
    # Words e0 and e1 against one patch e0: cosines 1 and 0, and Z = log(e^τ2 + e^0).
    z = losses.local_similarity(
        zpatch=_eye(0)[None],
        zwords=_eye(0, 1)[None],
        word_mask=np.ones((1, 2), bool),
        temperature1=4.0,
        temperature2=5.0,
    )
    np.testing.assert_allclose(float(z[0, 0]), np.log(np.exp(5.0) + 1.0), rtol=1e-6)


def test_local_loss_by_hand():
    # Image k has patches (e_2k, e_2k+1), report k the one word e_2k (then two padded slots of
    # garbage): Z = 3/√10 on the diagonal and 0 off it (see above), so with τ2 = τ3 = 1 each
    # direction is the cross-entropy of logits (r, 0) with r = 3/√10, log(1 + e^r) − r.
    zpatch = np.stack([_eye(0, 1), _eye(2, 3)])
    zwords = np.stack([_eye(0, 5, 6), _eye(2, 7, 7)])
    word_mask = np.array([[True, False, False], [True, False, False]])
    loss, metrics = lc.jit(
        losses.gloria_local_loss, temperature1=np.log(3.0), temperature2=1.0, temperature3=1.0
    )(zwords=zwords, word_mask=word_mask, zpatch=zpatch)
    r = 3 / np.sqrt(10)
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(r)) - r, rtol=1e-6)
    assert float(metrics["i2t_accuracy"]) == 1.0 and float(metrics["words"]) == 1.0


def test_a_report_without_words_is_finite_and_moves_nothing():
    """A report whose every word is masked (an empty report) scores the same against every
    image: the loss stays finite and its masked words get no gradient."""
    _, arrays, static, _ = lc.case_gloria_local(np.random.default_rng(10), 1)
    arrays["word_mask"][3] = False
    arrays["zwords"][3] = np.nan

    def loss_fn(zwords, zpatch):
        return losses.gloria_local_loss(
            zwords=zwords, zpatch=zpatch, word_mask=arrays["word_mask"], **static
        )[0]

    loss, (d_words, d_patch) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        jnp.asarray(arrays["zwords"]), jnp.asarray(arrays["zpatch"])
    )
    lc.assert_finite((loss, d_words, d_patch), "empty report")
    assert not np.any(np.asarray(d_words)[3])
