"""``run.evaluate`` dispatches every configured evaluator through the registry; the evaluators run
in training and from the command line, and a trained workdir loads as the Python API."""

import inspect
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from region_medclip.evaluators import plots, registry, run

KINDS = (
    "zero_shot",
    "retrieval",
    "regions",
    "grounding",
    "modality_gap",
    "multiclass",
    "linear_probe",
    "fewshot",
    "phrase_grounding",
    "detection",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**evals) -> ml_collections.ConfigDict:
    """The parts of a config that ``run.evaluate`` reads itself, with ``config.evals``."""
    data = dict(eval="synth_cxr", image_size=8, text_len=8)
    return ml_collections.ConfigDict(dict(data=data, train=dict(eval_every=5), evals=evals))


def test_the_registry_holds_one_evaluator_per_kind():
    assert tuple(registry.KINDS) == KINDS
    evaluators = list(registry.KINDS.values())
    assert len({e.run for e in evaluators}) == len({e.plot for e in evaluators}) == len(KINDS)
    for evaluator in evaluators:
        for fn in (evaluator.run, evaluator.plot):
            parameters = inspect.signature(fn).parameters
            assert parameters["ctx"].kind is inspect.Parameter.KEYWORD_ONLY
            assert set(evaluator.options) <= set(parameters)
        assert not set(evaluator.options) & set(registry.COMMON)
    # run.py reads kinds only through the registry: it names none of them.
    source = inspect.getsource(run)
    assert not any(f'"{kind}"' in source or f"'{kind}'" in source for kind in KINDS)


def test_eval_config_defaults_and_errors():
    config = _config(
        zs=dict(kind="zero_shot", prompts="sentences"),
        ret=dict(kind="retrieval", bootstrap=20, every=0),
        bad=dict(kind="nope"),
        typo=dict(kind="grounding", treshold=0.3),
    )
    cfg = run.eval_config(config, "zs")
    common = dict(
        kind="zero_shot", every=5, dataset=None, split="test", max_examples=0, batch_size=64
    )
    own = dict(
        prompts="sentences",
        negatives="prompts",
        bootstrap=1000,
        classes=(),
        class_names=(),
        coop="",
    )
    assert cfg == dict(common, **own)
    assert registry.options(cfg) == own
    # One line may set a key for every evaluator: the kinds that do not read it ignore it.
    cfg = run.eval_config(config, "ret")
    assert cfg["every"] == 0 and registry.options(cfg) == {}
    with pytest.raises(ValueError, match=r"config.evals.bad.kind: 'nope' is not one of \('zero"):
        run.eval_config(config, "bad")
    with pytest.raises(ValueError, match=r"config.evals.typo: unknown keys \['treshold'\]"):
        run.eval_config(config, "typo")


def _fake_evaluators(monkeypatch, calls: list) -> None:
    """Replaces every registry evaluator by one that records its calls."""

    def fake(kind: str) -> registry.Evaluator:
        def run_(emb, *, ctx, **options):
            calls.append(("run", kind, ctx.split, ctx.dataset.name, ctx.grid, options))
            return {"n": float(len(calls))}

        def plot_(emb, path, *, ctx, **options):
            calls.append(("plot", kind, os.path.basename(path), options))
            with open(path, "wb") as f:
                f.write(b"png")

        return registry.Evaluator(run_, plot_, registry.KINDS[kind].options)

    for kind in KINDS:
        monkeypatch.setitem(registry.KINDS, kind, fake(kind))


def test_evaluate_dispatches_each_configured_kind(monkeypatch, tmp_path):
    calls, embedded = [], []
    _fake_evaluators(monkeypatch, calls)

    def embed_split(model, params, data_config, *, split, batch_size, grid, max_examples):
        embedded.append((data_config.eval, split, batch_size, grid, max_examples))
        return {"zimg": np.zeros((3 if split == "test" else 2, 4))}

    monkeypatch.setattr(run.embeddings_lib, "embed_split", embed_split)
    monkeypatch.setattr(run, "patch_grid", lambda model, config: 4)
    paired = dict(kind="zero_shot", negatives="normal", split="validation")
    other = dict(kind="retrieval", dataset="roco")  # another dataset: its own embedding pass
    config = _config(**{kind: dict(kind=kind) for kind in KINDS}, paired=paired, other=other)
    results = run.evaluate(config, None, None, plot_dir=str(tmp_path / "plots"))
    names = list(config.evals)  # the config's order (a ConfigDict sorts its keys)
    assert list(results) == names and len(names) == len(KINDS) + 2
    assert [results[n]["examples"] for n in names] == [2.0 if n == "paired" else 3.0 for n in names]
    assert sorted(embedded) == [  # one pass a dataset and split
        ("roco", "test", 64, 4, 0),
        ("synth_cxr", "test", 64, 4, 0),
        ("synth_cxr", "validation", 64, 4, 0),
    ]
    runs = dict(zip(names, (c[1:] for c in calls if c[0] == "run"), strict=True))
    expected = {**{k: k for k in KINDS}, "paired": "zero_shot", "other": "retrieval"}
    assert {n: r[0] for n, r in runs.items()} == expected
    assert all(r[1:4] == ("test", "synth_cxr", 4) for n, r in runs.items() if n in KINDS)
    assert runs["other"][1:4] == ("test", "roco", 4)
    assert runs["zero_shot"][4] == dict(
        prompts="templates",
        negatives="prompts",
        bootstrap=1000,
        classes=(),
        class_names=(),
        coop="",
    )
    assert runs["grounding"][4] == dict(threshold=0.5, tolerance=0.0)
    assert runs["paired"][1] == "validation" and runs["paired"][4]["negatives"] == "normal"
    assert all(runs[k][4] == {} for k in ("retrieval", "regions", "modality_gap"))
    plotted = [c[2] for c in calls if c[0] == "plot"]
    assert plotted == [f"{name}.png" for name in results]
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(plotted)
    # Only the evaluators named run, and without plot_dir nothing is plotted.
    calls.clear()
    assert list(run.evaluate(config, None, None, names=["regions"])) == ["regions"]
    assert [c[:2] for c in calls] == [("run", "regions")]
    assert run.evaluate(config, None, None, names=[]) == {}
    with pytest.raises(ValueError, match="config.evals.bad.kind"):
        run.evaluate(_config(bad=dict(kind="nope")), None, None)
    with pytest.raises(KeyError, match="config.evals.bad.dataset: unknown dataset 'nope'"):
        run.evaluate(_config(bad=dict(kind="retrieval", dataset="nope")), None, None)


def test_write_saves_json_and_scalars_and_returns_the_table(tmp_path):
    results = {
        "zero_shot": {"macro_auroc": 0.75, "macro_auroc/ci_low": 0.5, "auroc/nodule": 0.7},
        "a_long_evaluator_name": {"gap": 0.5, "top1": float("nan")},
    }
    scalars = []

    class Board:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

    text = run.write(str(tmp_path), 3, results, Board())
    saved = json.loads((tmp_path / "eval" / "3.json").read_text())
    assert saved == {"step": 3, **results, "a_long_evaluator_name": {"gap": 0.5, "top1": None}}
    assert ("eval/zero_shot/auroc/nodule", 0.7, 3) in scalars and len(scalars) == 4
    assert text == run.table(3, results)
    lines = text.splitlines()
    assert lines[0] == "evaluation at step 3" and len(lines) == 5  # no CI or per-class rows
    assert lines[-2].startswith("a_long_evaluator_name  gap")  # the name column fits


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


@pytest.fixture(scope="module")
def trained(synth_data_dir, tmp_path_factory) -> dict:
    """Two micro steps with every evaluator at step 2: the workdir, the training result and the
    evaluation it saved."""
    import micro_config

    from region_medclip import train

    c = micro_config.get_config(f"data_dir={synth_data_dir},steps=2,evals")
    # Not the kind's defaults: the API must score with what the run's evaluator names.
    c.evals.zero_shot.update(prompts="sentences", negatives="normal")
    workdir = tmp_path_factory.mktemp("evaluators") / "run"
    result = train.train_and_evaluate(c, str(workdir))
    saved = json.loads((workdir / "eval" / "2.json").read_text())
    return dict(data_dir=synth_data_dir, workdir=workdir, result=result, saved=saved)


def test_evaluators_run_in_training(trained):
    workdir, result, saved = trained["workdir"], trained["result"], trained["saved"]
    assert saved["step"] == 2 and set(KINDS) <= set(saved)
    # The 32 px test split holds 9 films: a full batch of 8 and a padded one of 1.
    assert saved["retrieval"]["examples"] == 9 and 1 <= saved["retrieval"]["i2t/median_rank"]
    assert 0 <= saved["zero_shot"]["macro_auroc"] <= 1
    assert 0 <= saved["regions"]["within_image_top1"] <= 1
    assert 0 <= saved["grounding"]["pointing_game"] <= 1
    assert 0 <= saved["modality_gap"]["gap"] <= 2
    assert result["eval"]["retrieval"]["i2t/R@10"] == saved["retrieval"]["i2t/R@10"]
    for kind in KINDS:  # one PNG per evaluator, readable as an image
        with Image.open(workdir / "plots" / "2" / f"{kind}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.slow
def test_the_evaluate_cli_reproduces_the_numbers(trained):
    """The CLI on the same checkpoint reproduces the numbers."""
    workdir, saved = trained["workdir"], trained["saved"]
    (workdir / "eval" / "2.json").unlink(missing_ok=True)
    evals_arg = f"data_dir={trained['data_dir']},steps=2,evals"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.evaluate",
            f"--config={os.path.join(ROOT, 'tests', 'micro_config.py')}:{evals_arg}",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation at step 2" in proc.stdout
    again = json.loads((workdir / "eval" / "2.json").read_text())
    assert again["retrieval"] == saved["retrieval"]
    assert again["regions"] == saved["regions"]
    # Every evaluator on the validation split, beside the test split's results.
    config_arg = f"--config={os.path.join(ROOT, 'tests', 'micro_config.py')}:{evals_arg}"
    proc = _run_module(
        "region_medclip.evaluate", config_arg, f"--workdir={workdir}", "--split=validation"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    validation = json.loads((workdir / "eval" / "2.validation.json").read_text())
    assert set(KINDS) <= set(validation) and validation["retrieval"]["examples"] == 11
    assert json.loads((workdir / "eval" / "2.json").read_text()) == again
    assert (workdir / "plots" / "2.validation" / "zero_shot.png").is_file()


def test_load_api(trained, caplog):
    import region_medclip
    from region_medclip.data import synth

    model = region_medclip.load(str(trained["workdir"]))
    record = synth.render_record(0, size=48)  # another size: preprocess resizes
    x = model.preprocess(record["image"])
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32
    z = model.encode_image(x)
    assert z.shape == (1, 32) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    t = model.encode_text(["no finding", record["report"]])
    assert t.shape == (2, 32) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    ids = model.tokenizer(["no finding"], 32)
    np.testing.assert_allclose(model.encode_text(ids), t[:1], atol=1e-6)  # batch of 1 vs 2
    assert model.zero_shot_settings() == dict(
        dataset="synth_cxr", prompts="sentences", negatives="normal"
    )
    probs = model.zero_shot(np.stack([record["image"]] * 2), ["Nodule", "pleural effusion"])
    assert probs.shape == (2, 2) and ((probs > 0) & (probs < 1)).all()
    # Against each finding's own negations: the same positive prompts, another reference.
    own = model.zero_shot(record["image"], ["nodule", "pleural effusion"], negatives="prompts")
    assert own.shape == (1, 2) and ((own > 0) & (own < 1)).all()
    assert not np.allclose(own, probs[:1])
    templates = model.zero_shot(record["image"], ["nodule"], prompts="templates")
    assert not np.allclose(templates, probs[:1, :1])
    every = model.zero_shot(record["image"])  # the dataset's findings, in its order
    assert every.shape == (1, 7)
    np.testing.assert_allclose(every[:, [0, 2]], probs[:1], rtol=1e-5)
    caplog.clear()
    model.zero_shot(record["image"], ["nodule", "hernia"])
    assert any("['hernia'] not among synth_cxr's findings" in m for m in caplog.messages)
    with pytest.raises(ValueError, match="negatives"):
        model.zero_shot(record["image"], ["nodule"], negatives="none")
    with pytest.raises(ValueError, match="has no negation"):
        model.zero_shot(record["image"], ["no finding"])
    with pytest.raises(ValueError, match="image 1: images must be uint8 or 16-bit"):
        model.preprocess([record["image"], record["image"].astype(np.float32)])
    caplog.clear()
    heat = model.ground(record["image"], "nodule in the right upper zone")
    assert heat.shape == (32, 32) and np.isfinite(heat).all()
    assert not any("were cut" in m for m in caplog.messages)
    long_phrase = " ".join(["small nodule in the right upper zone"] * 8)
    assert np.isfinite(model.ground(record["image"], long_phrase)).all()
    assert any("1 of 1 phrases are longer than data.caption_len" in m for m in caplog.messages)


def test_api_zero_shot_equals_the_evaluator(trained):
    """``load(W).zero_shot`` on the test films, uint8 as stored, reads the evaluator's AUROC."""
    import region_medclip
    from region_medclip.data import registry as data_registry
    from region_medclip.evaluators import common

    model = region_medclip.load(str(trained["workdir"]))
    source = data_registry.get("synth_cxr").data_source("test", model.config.data)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.stack([r["labels"] for r in records])
    probs = model.zero_shot(images)
    assert probs.shape == (len(records), 7)
    auroc = common.macro_auroc(probs, labels[:, 1:])  # "no finding" is class 0
    assert abs(auroc - trained["saved"]["zero_shot"]["macro_auroc"]) < 1e-6
    # The same films as 16-bit PNG values and as RGB read the same.
    wide = images.astype(np.uint16) * 257
    np.testing.assert_allclose(model.zero_shot(wide), probs, atol=1e-6)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    np.testing.assert_allclose(model.zero_shot(list(rgb)), probs, atol=1e-6)


def test_api_detect_returns_boxes_in_the_film_as_given(trained):
    import region_medclip
    from region_medclip.data import synth

    model = region_medclip.load(str(trained["workdir"]))
    square = synth.render_record(0, size=48)["image"]
    tall = np.concatenate([square, square[:16]])  # 64 × 48: padded left and right
    found = model.detect([square, tall], ["nodule", "pleural effusion"], detections=3)
    assert len(found) == 2
    for film, result in zip([square, tall], found, strict=True):
        height, width = film.shape
        boxes = result["boxes"]
        assert boxes.shape[1:] == (4,) and len(boxes) == len(result["scores"])
        assert (boxes[:, :2] <= boxes[:, 2:]).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
        assert (boxes[:, [1, 3]] <= height).all()
        assert ((result["scores"] > 0.5) & (result["scores"] <= 1)).all()  # above the clear zone
        assert set(result["phrases"].tolist()) <= {0, 1}
        assert np.bincount(result["phrases"], minlength=2).max() <= 3


def test_api_detect_looks_for_a_known_finding_with_its_prompt_set(trained):
    """A finding of the run's dataset is its prompt set's class embedding (as the evaluator
    looks for it), anything else the phrase as typed; prompts="none" takes every phrase as
    typed."""
    import region_medclip
    from region_medclip.evaluators import zero_shot

    model = region_medclip.load(str(trained["workdir"]))
    typed = model.encode_text_short(["nodule", "a spot on the lung"])
    np.testing.assert_allclose(
        model._phrase_embeddings(["nodule", "a spot on the lung"], "none"), typed
    )
    found = model._phrase_embeddings(["Nodule", "a spot on the lung"], "templates")
    np.testing.assert_allclose(found[1], typed[1])
    entry = model.config.data.eval
    from region_medclip.data import registry

    positive, _ = registry.get(entry, model.config.data.data_dir).prompts("templates", ["nodule"])
    encode = region_medclip.api.embeddings.text_encoder(
        model.module, model.params, model.tokenizer, model.text_len
    )
    np.testing.assert_allclose(found[0], zero_shot.class_embeddings(encode, positive)[0], atol=1e-6)
    assert not np.allclose(found[0], typed[0], atol=1e-3)


@pytest.mark.slow
def test_predict_cli(trained, tmp_path):
    import region_medclip
    from region_medclip.data import synth

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        region_medclip.load(str(tmp_path / "empty"))
    record = synth.render_record(0, size=48)
    png = tmp_path / "x.png"
    Image.fromarray(record["image"]).save(png)
    out = tmp_path / "heat.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.predict",
            f"--workdir={trained['workdir']}",
            f"--image={png}",
            "--labels=nodule,pleural effusion",
            "--phrase=nodule in the right upper zone",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith(("nodule", "pl"))]
    assert len(lines) == 2 and all(0 < float(line[-1]) < 1 for line in lines)
    assert Image.open(out).size == (32, 32)
    # A 16-bit PNG without --labels: every finding of the dataset, as the API scores the film.
    wide = tmp_path / "wide.png"
    Image.fromarray(record["image"].astype(np.uint16) * 257).save(wide)
    proc = _run_module(
        "region_medclip.predict", f"--workdir={trained['workdir']}", f"--image={wide}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line[:30].strip(): float(line[30:]) for line in proc.stdout.strip().splitlines()}
    model = region_medclip.load(str(trained["workdir"]))
    expected = dict(zip(model.dataset_findings(), model.zero_shot(record["image"])[0], strict=True))
    assert list(printed) == list(expected)
    np.testing.assert_allclose(list(printed.values()), list(expected.values()), atol=1e-4)
    # --detect: the boxes printed, and an overlay of the film as given.
    boxes = tmp_path / "boxes.png"
    proc = _run_module(
        "region_medclip.predict",
        f"--workdir={trained['workdir']}",
        f"--image={png}",
        "--detect=nodule,pleural effusion",
        f"--out={boxes}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {boxes}" in proc.stdout and Image.open(boxes).size == (48, 48)


@pytest.mark.slow
def test_robustness_cli(trained, tmp_path):
    out = tmp_path / "robustness.json"
    args = (f"--workdir={trained['workdir']}", "--num=16", "--size=64", f"--out={out}")
    proc = _run_module("region_medclip.robustness", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    presentations = ["square PNG", "5:6", "4:3", "JPEG q85", "16-bit PNG", "RGB"]
    assert list(results) == [*presentations, "confusions"]
    assert results["square PNG"]["delta"] == 0 and "| 16-bit PNG |" in proc.stdout
    assert abs(results["16-bit PNG"]["delta"]) < 1e-6 and "auroc/nodule" in results["RGB"]
    # What each finding is mistaken for: every other finding left out of its negatives in turn.
    nodule = results["confusions"]["nodule"]
    assert len(results["confusions"]) == 7 and len(nodule) == 7 and "without mass" in nodule
    assert "| finding | all films |" in proc.stdout


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
