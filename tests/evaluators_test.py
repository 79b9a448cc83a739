"""Evaluation metrics on hand-computed cases (and AUROC against scikit-learn)."""

import numpy as np
import pytest
from PIL import Image

from region_medclip.evaluators import common, grounding, modality_gap, plots, regions, retrieval


def test_auroc_hand_cases():
    assert common.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert common.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # Pairs (pos, neg): (0.8 > 0.1), (0.8 > 0.5), (0.4 > 0.1), (0.4 < 0.5) → 3/4.
    assert common.auroc([0.1, 0.5, 0.4, 0.8], [0, 0, 1, 1]) == 0.75
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert common.auroc([0.3, 0.5, 0.5], [0, 0, 1]) == 0.75
    assert np.isnan(common.auroc([0.1, 0.2], [1, 1]))
    # Uncertain labels (−1) are left out.
    assert common.auroc([0.1, 0.9, 0.0], [0, 1, -1]) == 1.0


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(size=n) + labels * trial / 10, 1)  # rounding makes ties
        assert common.auroc(scores, labels) == pytest.approx(
            metrics.roc_auc_score(labels, scores), abs=1e-12
        )


def test_macro_auroc_skips_one_sided_classes():
    scores = np.array([[0.1, 0.9, 0.3], [0.9, 0.1, 0.4], [0.2, 0.8, 0.5]])
    labels = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 1]])
    per_class = common.per_class_auroc(scores, labels)
    np.testing.assert_array_equal(per_class[:2], [1.0, 1.0])
    assert np.isnan(per_class[2])
    assert common.macro_auroc(scores, labels) == 1.0


def test_bootstrap_ci_brackets_the_estimate_and_narrows():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = labels + rng.normal(size=400)
    estimate = common.auroc(scores, labels)
    low, high = common.bootstrap_ci(common.auroc, scores, labels, num_samples=300)
    assert low < estimate < high and high - low < 0.15
    low_small, high_small = common.bootstrap_ci(
        common.auroc, scores[:60], labels[:60], num_samples=300
    )
    assert high_small - low_small > high - low
    # Perfect separation: every resample is 1.
    assert common.bootstrap_ci(common.auroc, np.array([0.0, 1.0] * 5), np.array([0, 1] * 5)) == (
        1.0,
        1.0,
    )


def test_top_k_and_f1():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    targets = np.array([1, 1, 0])
    assert common.top_k_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert common.top_k_accuracy(logits, targets, 2) == pytest.approx(2 / 3)
    assert common.top_k_accuracy(logits, targets, 3) == 1.0
    # predictions [1, 0, 2] vs targets [1, 1, 0]: F1 class0 = 0, class1 = 2/3, class2 = 0.
    assert common.macro_f1(np.array([1, 0, 2]), targets, 3) == pytest.approx((0 + 2 / 3 + 0) / 3)
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    labels = np.array([[1, 0], [0, 1], [0, -1]])
    # class 0: tp 1, fp 1 → F1 2/3; class 1 (third row uncertain, left out): tp 1 → 1.
    assert common.multilabel_f1(probs, labels) == pytest.approx((2 / 3 + 1) / 2)


def test_retrieval_ranks_and_recall():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.1], [0.3, 0.6, 0.2]])
    ranks = retrieval.ranks_of_positives(sim)
    np.testing.assert_array_equal(ranks, [1, 2, 3])
    assert retrieval.recall_at_k(ranks, (1, 2)) == {1: 1 / 3, 2: 2 / 3}
    # A tie with a negative is not counted in the model's favour.
    np.testing.assert_array_equal(retrieval.ranks_of_positives(np.array([[0.5, 0.5]])), [2])
    # Extra positives: query 2's best positive is column 1 (0.6) → rank 1.
    pos = np.eye(3, dtype=bool)
    pos[2, 1] = True
    np.testing.assert_array_equal(retrieval.ranks_of_positives(sim, pos), [1, 2, 1])


def test_retrieval_metrics_both_directions():
    z = np.eye(4)
    m = retrieval.retrieval_metrics(z, z, ks=(1,))
    assert m == {"i2t/R@1": 1.0, "i2t/median_rank": 1.0, "t2i/R@1": 1.0, "t2i/median_rank": 1.0}
    # Texts shifted by one: image i matches text i + 1 best; the true one ranks last.
    shifted = np.roll(z, 1, axis=0)
    m = retrieval.retrieval_metrics(z, shifted, ks=(1, 4))
    assert m["i2t/R@1"] == 0.0 and m["i2t/R@4"] == 1.0


def test_same_text_positives_come_from_tokens_not_embeddings():
    texts = np.array([[5, 6, 0], [5, 6, 0], [5, 7, 0], [8, 0, 0]])
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(retrieval.same_text_positives(texts), expected)
    # A collapsed text tower (four different reports, one embedding) scores every report alike
    # for an image: the true one ties with three others and gets the pessimistic rank 4. Had
    # equal embeddings counted as equal reports, every query would have scored R@1 = 1.
    rng = np.random.default_rng(0)
    zimg = rng.normal(size=(4, 8))
    ztxt = np.repeat(rng.normal(size=(1, 8)), 4, axis=0)
    distinct = retrieval.same_text_positives(np.arange(4)[:, None])
    m = retrieval.retrieval_metrics(zimg, ztxt, distinct, ks=(1, 4))
    assert m["i2t/R@1"] == 0.0 and m["i2t/median_rank"] == 4.0 and m["i2t/R@4"] == 1.0
    # Identical reports (rows 0 and 1 of `texts`) are matches of each other in both directions:
    # image 0 retrieves report 1 and report 0 retrieves image 1 (with the diagonal alone, 0.5).
    zimg, ztxt = np.eye(4), np.eye(4)[[1, 0, 2, 3]]
    m = retrieval.retrieval_metrics(zimg, ztxt, expected, ks=(1,))
    assert m["i2t/R@1"] == 1.0 and m["t2i/R@1"] == 1.0
    assert retrieval.retrieval_metrics(zimg, ztxt, ks=(1,))["i2t/R@1"] == 0.5


def test_region_matching():
    e = np.eye(3)
    zroi = np.stack([e, e])  # [2 images, 3 ROIs, D = 3]
    zcap = np.stack([e, e[[1, 0, 2]]])  # image 1's first two captions swapped
    mask = np.array([[True, True, False], [True, True, True]])
    # image 0: 2 of 2 right; image 1: ROI 2 right, ROIs 0 and 1 wrong → 3 / 5.
    assert regions.within_image_top1(zroi, zcap, mask) == pytest.approx(3 / 5)
    out = regions.split_retrieval(zroi, zcap, mask)
    # Across the split each ROI direction e_k matches several identical captions; ties count
    # against the model, so only ranks are checked to be ≥ 1 and R@10 = 1.
    assert out["r2c/R@10"] == 1.0 and out["r2c/top1"] == out["r2c/R@1"]
    # With caption ids saying which captions are the same text, duplicates are hits.
    ids = np.array([[0, 1, -1], [1, 0, 2]])
    out = regions.split_retrieval(zroi, zcap, mask, cap_ids=ids)
    assert out["r2c/R@1"] < 1.0  # image 1's swapped captions still miss


def test_grounding_metrics():
    mask = grounding.boxes_mask(np.array([[1, 1, 3, 3]]), 4, 4)
    assert mask.sum() == 4 and mask[1:3, 1:3].all()
    heat = np.zeros((4, 4))
    heat[1:3, 1:3] = [[1.0, 3.0], [1.0, 3.0]]
    # inside: [1, 3, 1, 3] mean 2 var 1; outside: zeros mean 0 var 0 → CNR 2.
    assert grounding.cnr(heat, mask) == pytest.approx(2.0)
    assert grounding.pointing_game(heat, mask) == 1.0
    assert grounding.pointing_game(-heat, mask) == 0.0
    # Normalised ≥ 0.5: the two 3.0 pixels → IoU 2 / 4.
    assert grounding.iou_at_threshold(heat, mask, 0.5) == pytest.approx(0.5)
    assert grounding.iou_at_threshold(heat, mask, 0.2) == pytest.approx(1.0)


def test_pointing_game_tolerance():
    mask = grounding.boxes_mask(np.array([[13, 4, 20, 9]]), 32, 32)  # x 13..19, y 4..8
    heat = np.zeros((32, 32))
    heat[6, 10] = 1.0  # 3 px left of the box's first column, level with it
    assert grounding.pointing_game(heat, mask) == 0.0
    assert grounding.pointing_game(heat, mask, tolerance=3.0) == 1.0
    assert grounding.pointing_game(heat, mask, tolerance=2.9) == 0.0
    heat[6, 10], heat[12, 10] = 0.0, 1.0  # 3 px left of and 4 px below the corner (13, 8): 5 px
    assert grounding.pointing_game(heat, mask, tolerance=5.0) == 1.0
    assert grounding.pointing_game(heat, mask, tolerance=4.9) == 0.0
    assert grounding.pointing_game(heat, np.zeros_like(mask), tolerance=5.0) == 0.0


def test_a_box_between_patch_centres_needs_the_tolerance():
    from region_medclip.evaluators import run

    # 3 × 3 cells on a 24-px image, cell centres at 4, 12 and 20 px. A perfect map peaks at the
    # middle cell (pixels 11-12), but the thin box (rows 14-15) holds no cell centre.
    emb = dict(
        images=np.zeros((1, 24, 24)),
        zpatch=np.eye(9)[None],
        zcap=np.eye(9)[None, [4]],
        boxes=np.array([[[8 / 24, 14 / 24, 16 / 24, 16 / 24]]]),
        roi_mask=np.array([[True]]),
    )
    out = run.grounding_metrics(emb, grid=3, threshold=0.5, tolerance=3.0)
    assert out["pointing_game"] == 0.0 and out["pointing_game@3px"] == 1.0
    assert "pointing_game@3px" not in run.grounding_metrics(emb, grid=3, threshold=0.5)


def test_upsample_is_bilinear_and_keeps_constants():
    np.testing.assert_allclose(grounding.upsample(np.full((2, 2), 3.0), 8, 8), 3.0)
    up = grounding.upsample(np.array([[0.0, 1.0]]), 1, 4)
    np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def test_modality_gap():
    zimg = np.array([[1.0, 0.0], [1.0, 0.0]])
    ztxt = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert modality_gap.modality_gap(zimg, ztxt) == pytest.approx(np.sqrt(2))
    assert modality_gap.modality_gap(zimg, zimg) == 0.0


def test_grounding_on_an_oracle_heatmap():
    from region_medclip.evaluators import run

    e = np.eye(4)
    emb = dict(
        images=np.zeros((1, 8, 8)),
        zpatch=e[None],  # 2 × 2 cells, cell k has embedding e_k
        zcap=e[None, [0, 3]],  # ROI 0 described like cell 0 (top-left), ROI 1 like cell 3
        boxes=np.array([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]]),
        roi_mask=np.array([[True, True]]),
    )
    out = run.grounding_metrics(emb, grid=2, threshold=0.5)
    assert out["pointing_game"] == 1.0 and out["phrases"] == 2
    assert out["cnr"] > 1.0 and out["miou@0.5"] > 0.5
    emb["zcap"] = e[None, [3, 0]]  # phrases swapped: both point to the other corner
    out = run.grounding_metrics(emb, grid=2, threshold=0.5)
    assert out["pointing_game"] == 0.0 and out["cnr"] < 0
    # A clear-region box (label "no finding") is not a phrase to ground: only ROI 0 is scored.
    emb["zcap"] = e[None, [0, 0]]
    emb["box_labels"], emb["no_finding"] = np.array([[3, 0]]), 0
    out = run.grounding_metrics(emb, grid=2, threshold=0.5)
    assert out["phrases"] == 1 and out["pointing_game"] == 1.0
    emb["no_finding"] = -1  # a dataset without that class grounds every box
    assert run.grounding_metrics(emb, grid=2, threshold=0.5)["phrases"] == 2


def test_zero_shot_with_an_oracle_text_encoder():
    """Images that point at their finding's prompt direction get AUROC 1 and top-1 1."""
    from region_medclip.evaluators import zero_shot

    names = ["no finding", "nodule", "mass"]
    directions = {"no finding": 0, "nodule": 1, "mass": 2}

    def encode(texts):
        out = np.zeros((len(texts), 4))
        for i, t in enumerate(texts):
            negated = t.lower().startswith(("no ", "there is no", "findings: no", "impression: no"))
            name = next((n for n in names[1:] if n in t), "no finding")
            out[i, 3 if negated and name != "no finding" else directions[name]] = 1.0
        return out

    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    zimg = np.array([[1, 0, 0, 0.5], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 1, 0, 0.5]])
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    out = zero_shot.evaluate(
        zimg=zimg, labels=labels, class_names=names, encode=encode, logit_scale=10.0, bootstrap=50
    )
    assert out["auroc/nodule"] == 1.0 and out["auroc/mass"] == 1.0 and out["macro_auroc"] == 1.0
    assert "auroc/no finding" not in out
    assert out["top1"] == 1.0 and out["macro_f1"] == 1.0


def test_sentence_prompts_are_the_sentences_reports_state_findings_with():
    from region_medclip.data import synth, synth_text, transforms
    from region_medclip.evaluators import zero_shot

    names = list(synth.LABELS)
    prompts = zero_shot.sentence_prompts(names)
    assert prompts[0] == [t.format("no finding") for t in zero_shot.POSITIVE_TEMPLATES]
    assert all(len(set(group)) == len(group) for group in prompts)
    assert not any("  " in p for group in prompts for p in group)  # empty severity left no gap
    # Every sentence a synthetic report states a finding with is one of that finding's prompts,
    # and no prompt names another finding's location set (effusions only at the bases).
    rng = np.random.default_rng(0)
    seen = {name: set() for name in names[1:]}
    for _ in range(400):
        name = names[1 + rng.integers(len(names) - 1)]
        side, zone = synth.LOCATIONS[name][rng.integers(len(synth.LOCATIONS[name]))]
        severity = synth_text.SEVERITIES[name][rng.integers(len(synth_text.SEVERITIES[name]))]
        finding = synth.Finding(name, side, zone, severity, (0.0, 0.0, 1.0, 1.0))
        first = transforms.report_sentences(synth_text.report([finding], rng))[0]
        assert first in prompts[names.index(name)], (name, first)
        seen[name].add(first)
    assert all(seen.values())
    effusion = prompts[names.index("pleural effusion")]
    assert all(("base" in p or "lower" in p) for p in effusion)
    assert "The heart is enlarged." in prompts[names.index("cardiomegaly")]


def test_report_prompts_use_the_report_language():
    from region_medclip.data import synth_text
    from region_medclip.evaluators import zero_shot

    names = ["no finding", "cardiomegaly", "pleural effusion"]
    positive, negative = zero_shot.report_prompts(names)
    assert positive[0] == [t.format("no finding") for t in zero_shot.POSITIVE_TEMPLATES]
    assert "There is enlarged heart." in positive[1] and "IMPRESSION: effusion." in positive[2]
    # Absent cardiomegaly is ruled out the way the reports do it, not as "No cardiomegaly."
    assert negative[1] == list(synth_text.NEGATIONS["cardiomegaly"])
    assert not any("  " in p for group in positive for p in group)  # empty severity left no gap
    # An oracle encoder that reads the report sentences gets AUROC 1 with them.
    rules = {"heart": 1, "cardiac": 1, "cardiomegaly": 1, "effusion": 2, "fluid": 2}

    def encode(texts):
        out = np.zeros((len(texts), 4))
        for i, t in enumerate(texts):
            hit = next((d for w, d in rules.items() if w in t.lower()), 0)
            normal = t.lower().startswith("no ") or "normal" in t.lower()
            out[i, 3 if normal and hit else hit] = 1.0
        return out

    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    zimg = np.array([[1, 0, 0, 1], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 1, 1, 0.2]], float)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    out = zero_shot.evaluate(
        zimg=zimg,
        labels=labels,
        class_names=names,
        encode=encode,
        logit_scale=10.0,
        prompts="report",
        bootstrap=20,
    )
    assert out["auroc/cardiomegaly"] == 1.0 and out["auroc/pleural effusion"] == 1.0
    with pytest.raises(ValueError, match="prompts"):
        zero_shot.evaluate(
            zimg=zimg,
            labels=labels,
            class_names=names,
            encode=encode,
            logit_scale=1.0,
            prompts="nope",
        )


def test_evaluators_run_in_training_and_from_the_command_line(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import micro_config

    from region_medclip import train
    from region_medclip.data.builders import synth_cxr

    data_dir = str(tmp_path / "tfds")
    synth_cxr.ensure_built(data_dir, size=32, num=160, seed=0)
    c = micro_config.get_config(f"data_dir={data_dir},steps=2,evals")
    kinds = ("zero_shot", "retrieval", "regions", "grounding", "modality_gap")
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(c, str(workdir))
    saved = json.loads((workdir / "eval" / "2.json").read_text())
    assert saved["step"] == 2 and set(kinds) <= set(saved)
    # The 32 px test split holds 9 films: a full batch of 8 and a padded one of 1.
    assert saved["retrieval"]["examples"] == 9 and 1 <= saved["retrieval"]["i2t/median_rank"]
    assert 0 <= saved["zero_shot"]["macro_auroc"] <= 1
    assert 0 <= saved["regions"]["within_image_top1"] <= 1
    assert 0 <= saved["grounding"]["pointing_game"] <= 1
    assert 0 <= saved["modality_gap"]["gap"] <= 2
    assert result["eval"]["retrieval"]["i2t/R@10"] == saved["retrieval"]["i2t/R@10"]
    for kind in kinds:  # one PNG per evaluator, readable as an image
        with Image.open(workdir / "plots" / "2" / f"{kind}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    # The CLI on the same checkpoint reproduces the numbers.
    (workdir / "eval" / "2.json").unlink()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    evals_arg = f"data_dir={data_dir},steps=2,evals"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.evaluate",
            f"--config={os.path.join(root, 'tests', 'micro_config.py')}:{evals_arg}",
            f"--workdir={workdir}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation at step 2" in proc.stdout
    again = json.loads((workdir / "eval" / "2.json").read_text())
    assert again["retrieval"] == saved["retrieval"]
    assert again["regions"] == saved["regions"]


def test_load_api_and_predict_cli(tmp_path, caplog):
    import os
    import subprocess
    import sys

    import micro_config
    from PIL import Image

    import region_medclip
    from region_medclip import train
    from region_medclip.data import synth
    from region_medclip.data.builders import synth_cxr

    data_dir = str(tmp_path / "tfds")
    synth_cxr.ensure_built(data_dir, size=32, num=160, seed=0)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(micro_config.get_config(f"data_dir={data_dir},steps=2"), workdir)
    model = region_medclip.load(workdir)
    record = synth.render_record(0, size=48)  # another size: preprocess resizes
    x = model.preprocess(record["image"])
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32
    z = model.encode_image(x)
    assert z.shape == (1, 32) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    t = model.encode_text(["no finding", record["report"]])
    assert t.shape == (2, 32) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    ids = model.tokenizer(["no finding"], 32)
    np.testing.assert_allclose(model.encode_text(ids), t[:1], atol=1e-6)  # batch of 1 vs 2
    probs = model.zero_shot(np.stack([record["image"]] * 2), ["nodule", "pleural effusion"])
    assert probs.shape == (2, 2) and ((probs > 0) & (probs < 1)).all()
    # Against the normal-study prompts: the same positive prompts, one shared reference.
    normal = model.zero_shot(record["image"], ["nodule", "pleural effusion"], negatives="normal")
    assert normal.shape == (1, 2) and ((normal > 0) & (normal < 1)).all()
    assert not np.allclose(normal, probs[:1])
    with pytest.raises(ValueError, match="negatives"):
        model.zero_shot(record["image"], ["nodule"], negatives="none")
    caplog.clear()  # training warned about its micro config's reports cut to text_len
    heat = model.ground(record["image"], "nodule in the right upper zone")
    assert heat.shape == (32, 32) and np.isfinite(heat).all()
    assert not any("were cut" in m for m in caplog.messages)
    long_phrase = " ".join(["small nodule in the right upper zone"] * 8)
    assert np.isfinite(model.ground(record["image"], long_phrase)).all()
    assert any("1 of 1 phrases are longer than data.caption_len" in m for m in caplog.messages)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        region_medclip.load(str(tmp_path / "empty"))

    png = tmp_path / "x.png"
    Image.fromarray(record["image"]).save(png)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "heat.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.predict",
            f"--workdir={workdir}",
            f"--image={png}",
            "--labels=nodule,pleural effusion",
            "--phrase=nodule in the right upper zone",
            f"--out={out}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith(("nodule", "pl"))]
    assert len(lines) == 2 and all(0 < float(line[-1]) < 1 for line in lines)
    assert Image.open(out).size == (32, 32)


def test_roc_curve_matches_sklearn_and_integrates_to_auroc():
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=300), 1)  # rounded: many ties
    labels = (rng.random(300) < 0.3).astype(int)
    labels[:5] = -1  # uncertain: left out, as in auroc
    fpr, tpr = plots.roc_curve(scores, labels)
    keep = labels >= 0
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels[keep], scores[keep], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(common.auroc(scores, labels), abs=1e-12)


def test_pca_2d_finds_the_main_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    projected, ratio = plots.pca_2d(x)
    assert projected.shape == (500, 2)
    # The first two components are the two stretched input axes, up to sign.
    np.testing.assert_allclose(np.abs(projected[:, 0]), np.abs(x[:, 0] - x[:, 0].mean()), atol=0.2)
    assert ratio[0] > 0.85 and ratio[1] > 0.05


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    probs, labels = rng.random((40, 3)), (rng.random((40, 3)) < 0.5).astype(float)
    plots.plot_roc(probs, labels, ["a", "b", "c"], str(tmp_path / "roc.png"))
    plots.plot_recall({"x": rng.integers(1, 40, 40)}, str(tmp_path / "recall.png"))
    heat = rng.random((2, 32, 32))
    boxes = np.array([[2, 2, 10, 12], [5, 5, 30, 30]], float)
    plots.plot_grounding(heat, heat, boxes, ["p", "q"], str(tmp_path / "ground.png"))
    z = rng.normal(size=(20, 8))
    plots.plot_pca(
        z / np.linalg.norm(z, axis=1, keepdims=True), z[::-1] / 4, str(tmp_path / "p.png")
    )
    for name in ("roc", "recall", "ground", "p"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG"


def test_normal_negatives_survive_an_encoder_blind_to_negation():
    from region_medclip.evaluators import zero_shot

    names = ["no finding", "nodule", "mass"]
    directions = {"nodule": 0, "mass": 1}

    def bag_of_words(texts):
        # Reads finding words and ignores "no": "No nodule." embeds like "There is nodule.".
        out = np.zeros((len(texts), 3))
        for i, t in enumerate(texts):
            hit = [d for w, d in directions.items() if w in t.lower()]
            out[i, hit[0] if hit else 2] = 1.0
        return out

    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    zimg = np.array([[0, 0, 1], [1, 0, 0.5], [0, 1, 0.5], [1, 1, 0.2]], float)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    kw = dict(zimg=zimg, labels=labels, class_names=names, encode=bag_of_words, bootstrap=20)
    paired = zero_shot.evaluate(**kw, logit_scale=10.0)
    normal = zero_shot.evaluate(**kw, logit_scale=10.0, negatives="normal")
    assert paired["macro_auroc"] == 0.5  # positive and negative prompts embed alike: all ties
    assert normal["auroc/nodule"] == 1.0 and normal["auroc/mass"] == 1.0
    probs, _, _ = zero_shot.finding_probabilities(
        zimg=zimg[:1],
        class_names=names,
        encode=bag_of_words,
        logit_scale=10.0,
        prompts="templates",
        negatives="normal",
    )
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(10.0)), rtol=1e-6)  # normal film: p ≈ 0
    with pytest.raises(ValueError, match="negatives"):
        zero_shot.evaluate(**kw, logit_scale=1.0, negatives="nope")
