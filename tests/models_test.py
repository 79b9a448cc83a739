"""Towers: shapes of every variant, jit / eval_shape, bf16, masking, causality, pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from region_medclip.models import clip, region, text, vit

TINY_IMAGE = dict(variant="mu/16")
TINY_TEXT = dict(kind="clip", variant="mu", vocab_size=100, context_len=16)
TINY_REGION = dict(roi_size=2, sampling_ratio=2)


def _tiny_model(**overrides):
    kwargs = dict(image=TINY_IMAGE, text=TINY_TEXT, region=TINY_REGION, embed_dim=32)
    return clip.RegionCLIP(**{**kwargs, **overrides})


def _inputs(batch=2, size=32, length=16, rois=3, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    tokens = rng.integers(1, 90, size=(batch, length))
    tokens[:, -4:] = 0  # padding after the end-of-text token
    tokens[:, -5] = 99  # EOT: the highest id
    lo = rng.uniform(0, 0.5, size=(batch, rois, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, size=(batch, rois, 2))], -1)
    mask = np.ones((batch, rois), bool)
    mask[0, -1] = False
    return images, jnp.asarray(tokens, jnp.int32), jnp.asarray(boxes, jnp.float32), mask


@pytest.mark.parametrize("name", ["Ti", "S", "B", "L"])
@pytest.mark.parametrize("patch", [16, 32])
def test_vit_variant_shapes(name, patch):
    model = vit.vit_from_variant(f"{name}/{patch}", embed_dim=64)
    images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    pooled, tokens = jax.eval_shape(model.apply, variables, images)
    width = vit.decode_variant(f"{name}/{patch}")["width"]
    assert pooled.shape == (2, 64)
    assert tokens.shape == (2, 64 // patch, 96 // patch, width)


def test_vit_partials_match_variants():
    assert vit.ViT_B16(embed_dim=8).width == 768 and vit.ViT_B16(embed_dim=8).patch == 16
    assert vit.ViT_L32(embed_dim=8).depth == 24 and vit.ViT_L32(embed_dim=8).patch == 32
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.decode_variant("X/16")


@pytest.mark.parametrize("kind,variant", [("clip", "B"), ("clip", "L"), ("bert", "base")])
def test_text_variant_shapes(kind, variant):
    model = text.text_tower(kind, variant, embed_dim=48)
    tokens = jax.ShapeDtypeStruct((3, 20), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    pooled, states = jax.eval_shape(model.apply, variables, tokens)
    assert pooled.shape == (3, 48)
    assert states.shape == (3, 20, model.width)


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_vit_pooling_runs_and_differs(pool):
    images = _inputs()[0]
    model = vit.vit_from_variant("mu/16", embed_dim=16, pool=pool, class_token=pool == "cls")
    variables = model.init(jax.random.key(0), images)
    pooled, tokens = jax.jit(model.apply)(variables, images)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 2, 2, 64)
    assert np.isfinite(np.asarray(pooled)).all()
    if pool == "map":
        assert "map_head" in variables["params"]


def test_space_to_depth_orders_each_cell_row_major():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = vit.space_to_depth(x, 2)
    assert y.shape == (2, 2, 2, 12)
    # Cell (1, 0) of image 1 holds pixels (2..3, 0..1), row by row, channels innermost.
    want = np.concatenate([np.asarray(x[1, 2, 0:2]).ravel(), np.asarray(x[1, 3, 0:2]).ravel()])
    np.testing.assert_array_equal(np.asarray(y[1, 1, 0]), want)


@pytest.mark.parametrize("patch", [8, 16, 32])
def test_hmlp_stem_tokens_see_only_their_own_patch(patch):
    stem = vit.HMLPStem(width=32, patch=patch)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2 * patch, 3 * patch, 1)))
    variables = stem.init(jax.random.key(0), images)
    base = np.asarray(stem.apply(variables, images))
    assert base.shape == (1, 2, 3, 32)
    # A pixel of patch (1, 2), at a sub-cell position other than its first: only that token moves.
    moved = np.asarray(stem.apply(variables, images.at[0, patch + 5, 2 * patch + 6, 0].add(3.0)))
    changed = np.abs(moved - base).max(-1)[0] > 1e-6
    assert changed.tolist() == [[False, False, False], [False, False, True]]


def test_hmlp_stem_in_the_vit_and_bad_stems():
    images = _inputs()[0]
    model = vit.vit_from_variant("mu/16", embed_dim=16, pool="gap", stem="hmlp")
    variables = model.init(jax.random.key(0), images)
    assert "stem" in variables["params"] and "patch_embed" not in variables["params"]
    pooled, tokens = jax.jit(model.apply)(variables, images)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 2, 2, 64)
    with pytest.raises(ValueError, match="unknown stem"):
        vit.vit_from_variant("mu/16", embed_dim=16, stem="conv").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="stem='hmlp' needs a patch of 4"):
        vit.vit_from_variant("mu/14", embed_dim=16, stem="hmlp").init(
            jax.random.key(0), jnp.zeros((1, 28, 28, 3))
        )


def test_composite_outputs_are_normalised_and_masked():
    model = _tiny_model()
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    out = jax.jit(model.apply)(variables, images, tokens, boxes, mask)
    assert out["zimg"].shape == (2, 32) and out["ztxt"].shape == (2, 32)
    assert out["zroi"].shape == (2, 3, 32) and out["patch_tokens"].shape == (2, 2, 2, 64)
    for key in ("zimg", "ztxt"):
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    norms = np.linalg.norm(out["zroi"], axis=-1)
    np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(norms[~mask], 0.0)
    assert out["zimg"].dtype == jnp.float32
    np.testing.assert_allclose(out["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    np.testing.assert_allclose(out["logit_bias"], -10.0)


def test_encode_methods_agree_with_call():
    model = _tiny_model()
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    out = model.apply(variables, images, tokens, boxes, mask)
    zimg, patches = model.apply(variables, images, method="encode_image")
    ztxt = model.apply(variables, tokens, method="encode_text")
    zroi = model.apply(variables, patches, boxes, mask, method="encode_regions")
    np.testing.assert_allclose(zimg, out["zimg"], rtol=1e-6)
    np.testing.assert_allclose(ztxt, out["ztxt"], rtol=1e-6)
    np.testing.assert_allclose(zroi, out["zroi"], rtol=1e-6)
    # Leading dims of encode_text are kept: [b, R, L] captions → [b, R, D].
    many = model.apply(variables, jnp.stack([tokens, tokens], 1), method="encode_text")
    np.testing.assert_allclose(many[:, 1], ztxt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("proj,pool", [("shared", "mean"), ("own", "attn")])
def test_padded_box_never_changes_valid_rois(proj, pool):
    model = _tiny_model(region=dict(TINY_REGION, proj=proj, pool=pool))
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    base = model.apply(variables, images, tokens, boxes, mask)["zroi"]
    # Put garbage (NaN, huge, inverted) in the padded slot: valid ROIs must not move.
    junk = boxes.at[0, -1].set(jnp.array([jnp.nan, -1e9, 1e9, -5.0]))
    changed = model.apply(variables, images, tokens, junk, mask)["zroi"]
    np.testing.assert_array_equal(np.asarray(changed)[mask], np.asarray(base)[mask])
    assert np.isfinite(np.asarray(changed)).all()
    grads = jax.grad(
        lambda p: model.apply({"params": p}, images, tokens, junk, mask)["zroi"].sum()
    )(variables["params"])
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_shared_projection_is_the_image_projection():
    model = _tiny_model(region=dict(TINY_REGION, proj="shared"))
    images, tokens, boxes, mask = _inputs()
    params = model.init(jax.random.key(0), images, tokens, boxes, mask)["params"]
    assert "proj" not in params["region_tower"]
    own = _tiny_model(region=dict(TINY_REGION, proj="own"))
    assert (
        "proj" in own.init(jax.random.key(0), images, tokens, boxes, mask)["params"]["region_tower"]
    )


def test_region_head_uses_the_box_content():
    head = region.RegionHead(embed_dim=8, roi_size=2, proj="own")
    # Different content in the top-left and bottom-right quadrants.
    tokens = jnp.zeros((1, 4, 4, 16)).at[0, :2, :2, :8].set(1.0).at[0, 2:, 2:, 8:].set(1.0)
    boxes = jnp.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    variables = head.init(jax.random.key(0), tokens, boxes)
    z = head.apply(variables, tokens, boxes)
    assert not np.allclose(z[0, 0], z[0, 1])


def test_clip_text_is_causal_and_pools_at_eot():
    model = text.CLIPText(
        embed_dim=8, vocab_size=50, context_len=10, width=32, depth=2, heads=2, mlp_dim=64
    )
    tokens = jnp.array([[5, 6, 7, 49, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 49, 0]])
    variables = model.init(jax.random.key(0), tokens)
    pooled, states = model.apply(variables, tokens)
    # Changing a later token leaves earlier outputs unchanged.
    later = tokens.at[:, 5].set(11)
    _, states2 = model.apply(variables, later)
    np.testing.assert_allclose(states2[:, :5], states[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(states2[:, 5:], states[:, 5:])
    # EOT pooling: the pooled output is the projection of the state at the EOT position.
    kernel = variables["params"]["proj"]["kernel"]
    kernel = getattr(kernel, "value", kernel)
    np.testing.assert_allclose(pooled[0], states[0, 3] @ kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[1], states[1, 6] @ kernel, rtol=1e-5, atol=1e-6)
    # Row 0's padding (after EOT) cannot change its pooled output.
    pooled3, _ = model.apply(variables, tokens.at[0, 5].set(17))
    np.testing.assert_allclose(pooled3[0], pooled[0], rtol=1e-6, atol=1e-6)


def test_eot_positions_modes():
    tokens = jnp.array([[1, 9, 2, 0], [1, 2, 3, 4], [1, 9, 9, 0]])
    np.testing.assert_array_equal(text.eot_positions(tokens, "argmax"), [1, 3, 1])
    # eos id 9: first occurrence; a row without one pools at its last real token.
    np.testing.assert_array_equal(text.eot_positions(tokens, 9), [1, 3, 1])
    np.testing.assert_array_equal(text.eot_positions(jnp.array([[4, 5, 0, 0]]), 9), [1])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_bert_padding_does_not_change_pooled(pool):
    model = text.BertText(
        embed_dim=8,
        vocab_size=50,
        context_len=12,
        width=32,
        depth=2,
        heads=2,
        mlp_dim=64,
        pool=pool,
    )
    short = jnp.array([[2, 7, 8, 9, 3]])
    padded = jnp.array([[2, 7, 8, 9, 3, 0, 0, 0, 0]])
    variables = model.init(jax.random.key(0), padded)
    a, states_a = model.apply(variables, short)
    b, states_b = model.apply(variables, padded)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states_a, states_b[:, :5], rtol=1e-5, atol=1e-6)
    # With the mask overridden to attend to padding, the output does change.
    c, _ = model.apply(variables, padded, attention_mask=jnp.ones_like(padded))
    assert not np.allclose(b, c, atol=1e-4)


def test_bf16_compute_is_finite():
    model = _tiny_model(dtype="bfloat16", text=dict(TINY_TEXT), remat=True)
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    leaves = jax.tree.leaves(variables["params"])
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # float32 params, bf16 compute
    out = jax.jit(model.apply)(variables, images, tokens, boxes, mask)
    assert out["patch_tokens"].dtype == jnp.bfloat16
    for key in ("zimg", "ztxt", "zroi"):
        assert out[key].dtype == jnp.float32 and np.isfinite(np.asarray(out[key])).all()


def test_remat_gives_the_same_values_and_grads():
    images, tokens, boxes, mask = _inputs()
    plain, remat = _tiny_model(), _tiny_model(remat=True)
    params = plain.init(jax.random.key(0), images, tokens, boxes, mask)["params"]

    def loss(model, p):
        out = model.apply({"params": p}, images, tokens, boxes, mask)
        return (out["zimg"] @ out["ztxt"].T).sum() + out["zroi"].sum()

    v1, g1 = jax.value_and_grad(lambda p: loss(plain, p))(params)
    v2, g2 = jax.value_and_grad(lambda p: loss(remat, p))(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bert_text_tower_in_composite():
    bert = dict(kind="bert", variant="mu", vocab_size=100, context_len=16, pool="mean")
    model = _tiny_model(text=bert)
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    out = model.apply(variables, images, tokens, boxes, mask)
    np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
@pytest.mark.parametrize("text_kind", ["clip", "bert"])
def test_attention_implementation_reaches_every_attention(monkeypatch, attention, text_kind):
    """``model.attention`` goes to every ``dot_product_attention`` call of every tower (the ViT's
    blocks and MAP head, the text blocks, the region head's attention pooling)."""
    seen = []
    original = jax.nn.dot_product_attention

    def record(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return original(*args, **kwargs)  # XLA's: the CPU has no cuDNN

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    text_tower = dict(TINY_TEXT, kind=text_kind) | ({"pool": "mean"} if text_kind == "bert" else {})
    model = _tiny_model(
        image=dict(TINY_IMAGE, pool="map"),
        text=text_tower,
        region=dict(TINY_REGION, pool="attn", heads=2),
        attention=attention,
    )
    jax.eval_shape(model.init, jax.random.key(0), *_inputs())
    image_blocks, text_blocks = vit.decode_variant("mu/16")["depth"], 2
    assert len(seen) >= image_blocks + 1 + text_blocks + 1
    assert set(seen) == {attention}


def test_attention_implementation_is_checked_by_name():
    from region_medclip import config as config_lib

    c = config_lib.base_config()
    assert c.model.attention == "xla"
    c.model.attention = "flash"
    with pytest.raises(config_lib.ConfigError, match=r"model.attention: 'flash'"):
        config_lib.validate(c)


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_context_vectors_replace_only_the_masked_token_embeddings(kind):
    tower = TINY_TEXT if kind == "clip" else dict(TINY_TEXT, kind="bert", pool="mean")
    model = _tiny_model(text=tower)
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    params = variables["params"]["text_tower"]
    table = params["token_embedding" if kind == "clip" else "word_embeddings"]["embedding"]
    own = jnp.asarray(nn.meta.unbox(table))[
        tokens
    ]  # the tokens' own embeddings as context: nothing changes
    context_mask = jnp.zeros(tokens.shape, bool).at[:, 1:3].set(True)
    plain = model.apply(variables, tokens, method="encode_text")
    same = model.apply(variables, tokens, (context_mask, own), method="encode_text")
    np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-7)
    values = jax.random.normal(jax.random.key(1), own.shape)

    def encoded(values):
        return model.apply(variables, tokens, (context_mask, values), method="encode_text")

    assert not np.allclose(encoded(values), plain, atol=1e-4)
    # Gradients reach the context values at the masked positions only.
    grads = jax.grad(lambda v: encoded(v).sum())(values)
    assert np.abs(np.asarray(grads)[:, 1:3]).sum() > 0
    np.testing.assert_array_equal(np.asarray(grads)[:, 3:], 0.0)
    np.testing.assert_array_equal(np.asarray(grads)[:, :1], 0.0)


def test_word_features_share_the_pooled_projection():
    model = _tiny_model()
    images, tokens, boxes, mask = _inputs()
    variables = model.init(jax.random.key(0), images, tokens, boxes, mask)
    words = model.apply(variables, tokens, method="encode_words")
    ztxt = model.apply(variables, tokens, method="encode_text")
    assert words.shape == (*tokens.shape, 32)
    np.testing.assert_allclose(np.linalg.norm(words, axis=-1), 1.0, rtol=1e-5)
    # CLIP pools at the end-of-text token: its word feature is the report embedding.
    eot = np.asarray(text.eot_positions(tokens, "argmax"))
    np.testing.assert_allclose(words[np.arange(len(eot)), eot], ztxt, rtol=1e-5, atol=1e-6)
