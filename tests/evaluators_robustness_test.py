"""The presentations of a film as real films arrive, and the AUROC of each."""

import numpy as np
from PIL import Image

from region_medclip.data import transforms
from region_medclip.evaluators import robustness


def _films(num: int = 24, size: int = 60):
    pairs = list(robustness.synth_films(num, size=size))
    return [f for f, _ in pairs], np.stack([label for _, label in pairs])[:, 1:]


def _as_array(film) -> np.ndarray:
    return np.asarray(transforms.gray_uint8(film))


def test_presentations_are_what_readers_hand_over():
    film = _films(1)[0][0]
    shown = {name: present(film) for name, present in robustness.presentations().items()}
    assert list(shown) == ["square PNG", "5:6", "4:3", "JPEG q85", "16-bit PNG", "RGB"]
    np.testing.assert_array_equal(_as_array(shown["square PNG"]), film)
    assert _as_array(shown["5:6"]).shape == (60, 50)  # H × W: portrait
    assert _as_array(shown["4:3"]).shape == (45, 60)
    assert isinstance(shown["JPEG q85"], Image.Image) and shown["JPEG q85"].format == "JPEG"
    jpeg = _as_array(shown["JPEG q85"]).astype(float)
    assert 0 < np.abs(jpeg - film).mean() < 4  # lossy, not another film
    assert shown["16-bit PNG"].mode.startswith("I")
    np.testing.assert_array_equal(_as_array(shown["16-bit PNG"]), film)
    np.testing.assert_array_equal(_as_array(shown["RGB"]), film)


def test_evaluate_scores_every_presentation_of_the_same_films():
    films, labels = _films()

    def edges(images):  # a stand-in model: every finding scored by the film's top and left edge
        square = [
            transforms.ResizePad(32).map({"image": _as_array(x), "boxes": []})["image"]
            for x in images
        ]
        scores = np.array([s[:2].mean() + s[:, :2].mean() for s in square])
        return np.repeat(scores[:, None], labels.shape[1], axis=1)

    results = robustness.evaluate(edges, films, labels, [f"c{k}" for k in range(7)])
    square = results["square PNG"]
    assert square["delta"] == 0.0 and 0 <= square["macro_auroc"] <= 1
    # Lossless presentations read exactly as the square PNG does; the padded ones do not.
    for name in ("16-bit PNG", "RGB"):
        assert results[name]["macro_auroc"] == square["macro_auroc"]
    for name in ("5:6", "4:3"):
        assert results[name]["delta"] != 0.0
    assert set(square) == {"macro_auroc", "delta", *(f"auroc/c{k}" for k in range(7))}
    text = robustness.table(results)
    assert text.count("\n") == len(results) + 1 and "| 4:3 |" in text


def test_confusions_by_hand():
    # Four films: a nodule, a mass, both, neither. The nodule score fires on the mass film.
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.6, 0.1], [0.9, 0.8], [0.7, 0.9], [0.2, 0.3]])
    rows = robustness.confusions(probs, labels, ["nodule", "mass"])
    # Nodule: positives 0.6, 0.7 against negatives 0.9 (the mass film), 0.2: 2 of 4 pairs.
    assert rows["nodule"]["all"] == 0.5
    # Without the mass film among its negatives: 0.6, 0.7 against 0.2 alone.
    assert rows["nodule"]["without mass"] == 1.0
    # Mass: positives 0.8, 0.9 against 0.1, 0.3: perfect either way.
    assert rows["mass"] == {"all": 1.0, "without nodule": 1.0}
    table = robustness.confusion_table(rows)
    assert "| nodule | 0.500 | – | 1.000 |" in table and table.count("\n") == 3
