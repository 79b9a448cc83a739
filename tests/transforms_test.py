"""Decoding films of every bit depth to gray, the aspect-and-pad augmentation, and the film's
area in the padded frame (`image_box`)."""

import io

import numpy as np
import pytest
from PIL import Image

from region_medclip.data import pipeline, synth, tokenizers, transforms


def _film(size: int = 64) -> np.ndarray:
    return synth.render_record(3, size=size)["image"]


def test_gray_uint8_reads_every_bit_depth_alike():
    film = _film()
    wide = film.astype(np.uint16) * 257  # the same film at 16 bits
    np.testing.assert_array_equal(transforms.gray_uint8(wide), film)
    png = io.BytesIO()
    Image.fromarray(wide).save(png, format="PNG")
    with Image.open(io.BytesIO(png.getvalue())) as pil:
        assert pil.mode.startswith("I")  # PIL's convert("L") would clip it at 255
        np.testing.assert_array_equal(transforms.gray_uint8(pil), film)
    rgb = np.repeat(film[..., None], 3, axis=-1)
    np.testing.assert_array_equal(transforms.gray_uint8(rgb), film)
    np.testing.assert_array_equal(transforms.gray_uint8(Image.fromarray(rgb)), film)
    np.testing.assert_array_equal(transforms.gray_uint8(film[..., None]), film)
    # 16-bit colour: PIL's luma weights.
    colour = np.zeros((2, 2, 3), np.uint16)
    colour[..., 0] = 65535
    assert (transforms.gray_uint8(colour) == round(0.299 * 255)).all()
    with pytest.raises(ValueError, match="uint8 or 16-bit integers, got float32"):
        transforms.gray_uint8(film.astype(np.float32))
    with pytest.raises(ValueError, match="outside 0..65535"):
        transforms.gray_uint8(np.full((2, 2), 70000, np.int32))


def test_decode_keeps_16_bit_png_contrast():
    film = _film()
    png = io.BytesIO()
    Image.fromarray(film.astype(np.uint16) * 257).save(png, format="PNG")
    example = {"id": "a", "image": png.getvalue(), "report": "No finding."}
    np.testing.assert_array_equal(transforms.Decode().map(example)["image"], film)


def test_aspect_pad_squeezes_one_side_and_moves_the_boxes():
    film = _film(64)
    boxes = np.array([[0, 0, 64, 64], [16, 8, 32, 40]], np.float32)
    example = {"image": film, "boxes": boxes}
    rng = np.random.default_rng(0)
    squeeze = transforms.AspectPad(p=1.0, min_aspect=0.75)
    seen = set()
    for _ in range(20):
        out = squeeze.random_map(example, rng)
        image, moved = out["image"], out["boxes"]
        assert image.shape == film.shape and image.dtype == np.uint8
        # The whole-frame box is now the film's content: everything outside it is black.
        x0, y0, x1, y1 = moved[0]
        assert (x0 > 0 or y0 > 0) and (x1 - x0) * (y1 - y0) >= 0.75 * 64 * 64 - 64
        squeezed = "width" if x0 > 0 else "height"
        seen.add(squeezed)
        band = image[:, : int(x0)] if squeezed == "width" else image[: int(y0)]
        assert band.size and (band == 0).all()
        # The inner box keeps its place relative to the frame box.
        rel = (moved[1] - [x0, y0, x0, y0]) / np.array([x1 - x0, y1 - y0] * 2)
        np.testing.assert_allclose(rel, boxes[1] / 64, atol=1e-5)
    assert seen == {"width", "height"}
    untouched = transforms.AspectPad(p=0.0).random_map(example, rng)
    assert untouched is example
    with pytest.raises(ValueError, match="config.data.aspect_pad"):
        transforms.AspectPad(p=1.5)


def test_aspect_pad_config_pads_training_films_only(synth_data_dir):
    from configs import tiny_roi

    c = tiny_roi.get_config("res=32")
    c.data.update(data_dir=synth_data_dir, synth=dict(num=160, seed=0), aspect_pad=1.0)
    train = next(
        iter(pipeline.make_dataset(c.data, split="train", train=True, seed=0, batch_size=8))
    )
    evaluation = next(
        iter(pipeline.make_dataset(c.data, split="test", train=False, seed=0, batch_size=8))
    )
    black = float(np.min((0.0 - transforms.MEAN) / transforms.STD))

    def padded(images):  # a black first or last row / column in every film
        edges = [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]]
        return np.any([np.all(np.isclose(e[..., 0], black), axis=-1) for e in edges], axis=0)

    # A squeeze to more than 31/32 of the side rounds to none: most films, not all, show bands.
    assert padded(train["images"]).mean() >= 0.75
    assert not padded(evaluation["images"]).any()


def test_report_negatives_change_what_the_report_finds_only():
    from region_medclip.data import negatives

    report = (
        "FINDINGS: There is a pulmonary nodule in the left middle zone. No pleural effusion. "
        "IMPRESSION: Left middle nodule."
    )
    negs = negatives.report_negatives(report, 8)
    assert negs == negatives.report_negatives(report, 8)  # deterministic
    assert negatives.report_negatives(report, 2) == negs[:2]
    assert len(negs) == 3 and report not in negs  # mass, right side, upper zone
    assert any("pulmonary mass" in n and "Left middle mass." in n for n in negs)
    assert any("in the right middle zone" in n and "Right middle nodule." in n for n in negs)
    # What the report rules out stays ruled out, in every negative.
    assert all("No pleural effusion." in n for n in negs)
    # A report that finds nothing has none: its negations, changed, still describe its film.
    normal = "FINDINGS: Lungs are clear. No focal consolidation. IMPRESSION: No acute process."
    assert negatives.report_negatives(normal, 4) == []


def test_report_negatives_in_training_batches_only(synth_data_dir):
    from configs import tiny_roi

    c = tiny_roi.get_config("res=32")
    c.data.update(data_dir=synth_data_dir, synth=dict(num=160, seed=0), report_negatives=2)
    train = next(
        iter(pipeline.make_dataset(c.data, split="train", train=True, seed=0, batch_size=8))
    )
    assert train["report_negatives"].shape == (8, 2, c.data.text_len)
    mask = train["report_neg_mask"]
    assert mask.shape == (8, 2) and mask.any()
    # A masked slot holds no tokens; a real one is a report that differs from the image's own.
    assert not train["report_negatives"][~mask].any()
    for i, k in zip(*np.nonzero(mask), strict=True):
        assert not np.array_equal(train["report_negatives"][i, k], train["texts"][i])
    evaluation = next(
        iter(pipeline.make_dataset(c.data, split="test", train=False, seed=0, batch_size=8))
    )
    assert "report_negatives" not in evaluation


def _finalized_box(example: dict) -> np.ndarray:
    """``image_box`` as ``Finalize`` outputs it for ``example`` (a square uint8 film)."""
    finalize = transforms.Finalize(
        tokenizer=tokenizers.synth_bpe(), max_rois=2, text_len=8, num_negatives=0
    )
    example = dict(example, report="Clear.", box_captions=[], box_labels=[], labels=[0.0])
    return finalize.map(example)["image_box"]


def test_image_box_follows_the_film_through_resize_pad_and_aspect_pad():
    # 40 × 80 (H × W) to 32: scale 0.4 → 16 × 32, centred with 8 rows above and below.
    wide = {"image": np.full((40, 80), 255, np.uint8), "boxes": np.zeros((0, 4), np.float32)}
    out = transforms.ResizePad(size=32).map(wide)
    np.testing.assert_array_equal(out["image_box"], [0, 8, 32, 24])
    rows = np.nonzero(out["image"].any(axis=1))[0]
    assert (rows.min(), rows.max() + 1) == (8, 24)
    np.testing.assert_allclose(_finalized_box(out), [0, 0.25, 1, 0.75])
    # AspectPad squeezes the frame: the box moves with the film and still bounds its pixels.
    rng = np.random.default_rng(0)
    squeeze = transforms.AspectPad(p=1.0, min_aspect=0.6)
    for _ in range(8):
        padded = squeeze.random_map(out, rng)
        x0, y0, x1, y1 = padded["image_box"]
        assert not np.array_equal(padded["image_box"], out["image_box"])
        rows = np.nonzero(padded["image"].any(axis=1))[0]
        cols = np.nonzero(padded["image"].any(axis=0))[0]
        np.testing.assert_allclose([cols.min(), rows.min()], [x0, y0], atol=1)
        np.testing.assert_allclose([cols.max() + 1, rows.max() + 1], [x1, y1], atol=1)
        np.testing.assert_allclose(_finalized_box(padded), padded["image_box"] / 32)
    # A square film fills the frame.
    square = {"image": _film(48), "boxes": np.zeros((0, 4), np.float32)}
    out = transforms.ResizePad(size=32).map(square)
    np.testing.assert_array_equal(out["image_box"], [0, 0, 32, 32])
    np.testing.assert_array_equal(_finalized_box(out), [0, 0, 1, 1])


def test_box_finding_marks_real_boxes_not_of_the_no_finding_class():
    """synth_cxr's clear lung zones (class 0, "no finding") are boxes but no findings; padded
    boxes are neither; with no such class every real box is a finding."""
    example = dict(
        image=np.zeros((16, 16), np.uint8),
        report="Nodule.",
        boxes=np.array([[1, 1, 5, 5], [8, 8, 12, 12]], np.float32),
        box_captions=["nodule", "clear right upper zone"],
        box_labels=[1, 0],
        labels=[0.0, 1.0],
    )
    kw = dict(tokenizer=tokenizers.synth_bpe(), max_rois=3, text_len=8, num_negatives=0)
    out = transforms.Finalize(**kw, no_finding=0).map(example)
    np.testing.assert_array_equal(out["box_finding"], [True, False, False])
    out = transforms.Finalize(**kw).map(example)
    np.testing.assert_array_equal(out["box_finding"], [True, True, False])
