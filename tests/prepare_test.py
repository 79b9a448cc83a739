"""``python -m region_medclip.prepare``: every real dataset's fixture prepared and read back by
name, the user's CSV datasets under names of their own, the closing summary (each bad row
counted once, by reason, with its id) and the command line."""

import json
import pathlib
import subprocess
import sys

import formats_fixtures as ff
import micro_config
import ml_collections
import numpy as np
import pytest
import tqdm

from region_medclip import prepare
from region_medclip.data import formats, pipeline, registry, schema
from region_medclip.data.builders import real

REAL = [name for name in real.BUILDERS if name != "csv"] + ["chexpert_5x200"]
NAMES = ("no finding", "nodule", "effusion")


class _Bar:
    """Stands in for ``tqdm.tqdm``: keeps the total it was given and the updates."""

    made: list["_Bar"] = []

    def __init__(self, total=None, **kwargs):
        del kwargs
        self.total, self.count = total, 0
        _Bar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.count += n

    def close(self) -> None:
        pass


@pytest.fixture
def bars(monkeypatch) -> list[_Bar]:
    """The progress bars ``prepare`` opens, in order."""
    _Bar.made = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    return _Bar.made


def _fixture(name: str, root: pathlib.Path) -> ff.Fixture:
    """The fixture ``name`` is prepared from; for the 5x200 subset one train film is made a
    candidate (the fixture's only one-finding frontal film is uncertain for edema)."""
    if name != "chexpert_5x200":
        return ff.WRITERS[name](root)
    fixture = ff.write_chexpert(root)
    edema = ff.CHEXPERT_HEADER.index("Edema")
    rows = (fixture.root / "train.csv").read_text().splitlines()
    cells = rows[1].split(",")
    rows[1] = ",".join([*cells[:edema], "", *cells[edema + 1 :]])
    (fixture.root / "train.csv").write_text("\n".join(rows) + "\n")
    return fixture


def _expected_splits(name: str, root: pathlib.Path) -> dict[str, int]:
    """Records per split as the reader reads the fixture (5x200: the one candidate)."""
    if name == "chexpert_5x200":
        return {"test": 1}
    fixture = ff.WRITERS[name](root)
    records = formats.READERS[name](fixture.root, verify_images=False, **fixture.options)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["split"]] = counts.get(record["split"], 0) + 1
    return counts


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _data_config(data_dir, name: str = "synth_cxr") -> ml_collections.ConfigDict:
    """``config.data`` of the micro config, training and evaluating on ``name``."""
    data = micro_config.get_config(f"data_dir={data_dir}").data
    data.train = data.eval = name
    return data


@pytest.mark.parametrize("name", REAL)
def test_every_real_dataset_prepares_and_reads_back_by_name(name, tmp_path, bars):
    fixture = _fixture(name, tmp_path / "raw")
    data_dir = tmp_path / "tfds"
    summary = prepare.prepare(name, str(fixture.root), str(data_dir))
    expected = _expected_splits(name, tmp_path / "expected")
    assert summary.dataset == name and summary.splits == expected
    assert summary.skipped == {}
    # One bar, counting every record written (its total is the first pass's count; 5x200's is
    # the subset's full size, as a real CheXpert fills it).
    [bar] = bars
    assert bar.count == sum(expected.values())
    assert bar.total == (1000 if name == "chexpert_5x200" else sum(expected.values()))
    saved = json.loads((pathlib.Path(summary.folder) / "prepare_summary.json").read_text())
    assert saved["splits"] == expected and saved["dataset"] == name
    assert saved["repaired"] == summary.repaired
    config = ml_collections.ConfigDict(dict(data_dir=str(data_dir)))
    for split, count in expected.items():
        source = registry.get(name).data_source(split, config)
        assert len(source) == count
        assert _text(source[0]["split"]) == split


def _write_user_csv(folder: pathlib.Path, rows: list[dict], *, missing=()) -> pathlib.Path:
    """``folder/data.csv`` with ``rows`` (list cells as JSON) and a 40 × 48 image for each
    row's ``image`` except those in ``missing``; returns the CSV's path."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [
        [json.dumps(row[c]) if isinstance(row.get(c), list) else row.get(c, "") for c in columns]
        for row in rows
    ]
    ff.write_csv(folder / "data.csv", columns, cells)
    for seed, image in enumerate(dict.fromkeys(row["image"] for row in rows)):
        if image not in missing:
            ff.write_image(folder / image, 40, 48, seed=seed)
    return folder / "data.csv"


def _labelled_rows(count: int = 6) -> list[dict]:
    """``count`` good rows over the three splits with three labels, the first with a box."""
    splits = ("train", "train", "validation", "test")
    rows = [
        dict(
            image=f"images/{k:04d}.png",
            caption=f"Report number {k}.",
            labels=[float(k % 3 == c) for c in range(3)],
            split=splits[k % len(splits)],
        )
        for k in range(count)
    ]
    rows[0].update(boxes=[[2, 3, 20, 30]], box_captions=["right upper nodule"])
    return rows


def test_label_names_arrive_with_the_users_dataset(tmp_path, bars):
    path = _write_user_csv(tmp_path / "mine", _labelled_rows())
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("csv", str(path), data_dir, name="mine", label_names=NAMES)
    assert summary.dataset == "mine" and summary.splits == {"train": 4, "validation": 1, "test": 1}
    assert summary.folder.startswith(str(tmp_path / "tfds" / "csv" / "mine"))
    entry = registry.get("mine", data_dir)
    assert entry.class_names() == list(NAMES)
    source = entry.data_source("train", _data_config(data_dir, "mine"))
    [example] = [source[k] for k in range(len(source)) if source[k]["boxes"].size]
    np.testing.assert_array_equal(example["labels"], [1, 0, 0])
    np.testing.assert_allclose(example["boxes"], [[2, 3, 20, 30]])


def test_without_names_the_label_count_comes_from_the_first_labelled_row(tmp_path, bars):
    rows = _labelled_rows(4)
    del rows[0]["labels"]  # the first row has none: C is read from the second
    path = _write_user_csv(tmp_path / "mine", rows)
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("csv", str(path), data_dir, name="unnamed")
    assert sum(summary.splits.values()) == 4 and summary.skipped == {}
    entry = registry.get("unnamed", data_dir)
    assert entry.label_names == ()
    with pytest.raises(ValueError, match="no label names"):
        entry.class_names()
    source = entry.data_source("train", _data_config(data_dir, "unnamed"))
    assert {tuple(source[k]["labels"]) for k in range(len(source))} == {(0, 0, 0), (0, 1, 0)}


def test_two_user_datasets_coexist_in_one_data_dir(tmp_path, bars):
    data_dir = str(tmp_path / "tfds")
    first = _write_user_csv(tmp_path / "first", _labelled_rows(4))
    second = _write_user_csv(tmp_path / "second", [dict(image="a.png", caption="Clear lungs.")])
    prepare.prepare("csv", str(first), data_dir, name="first", label_names=NAMES)
    prepare.prepare("csv", str(second), data_dir, name="second")
    assert sorted(registry.user_datasets(data_dir)) == ["first", "second"]
    assert registry.get("first", data_dir).class_names() == list(NAMES)
    assert registry.get("second", data_dir).label_names == ()
    config = _data_config(data_dir)
    assert len(registry.get("first", data_dir).data_source("train", config)) == 2
    second_entry = registry.get("second", data_dir)
    split = schema.patient_split("a.png")
    assert _text(second_entry.data_source(split, config)[0]["id"]) == "a.png"
    with pytest.raises(ValueError, match="'second' .* has no 'nope' split"):
        second_entry.data_source("nope", config)


@pytest.mark.parametrize("name", ["", "default", "synth_cxr", "chexpert"])
def test_a_users_dataset_needs_a_name_of_its_own(name, tmp_path):
    path = _write_user_csv(tmp_path / "mine", _labelled_rows(1))
    with pytest.raises(ValueError, match="--name"):
        prepare.prepare("csv", str(path), str(tmp_path / "tfds"), name=name, show_progress=False)
    assert not (tmp_path / "tfds").exists()


def test_bad_dataset_arguments_are_clear_errors(tmp_path):
    root = str(ff.write_roco(tmp_path / "raw").root)
    with pytest.raises(ValueError, match="--name / --label_names .* not 'roco'"):
        prepare.prepare("roco", root, str(tmp_path / "tfds"), name="mine")
    with pytest.raises(ValueError, match="--dataset: 'nope' is not one of .*'roco'"):
        prepare.prepare("nope", root, str(tmp_path / "tfds"))
    with pytest.raises(schema.DataError, match=f"--manual_dir: {tmp_path / 'absent'} does not"):
        prepare.prepare("roco", str(tmp_path / "absent"), str(tmp_path / "tfds"))


def test_the_plain_csv_entry_and_unknown_names_point_at_the_prepare_command(tmp_path):
    config = ml_collections.ConfigDict(dict(data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="'csv' is not a dataset.*prepare --dataset=csv"):
        registry.get("csv").data_source("train", config)
    with pytest.raises(KeyError, match="'my_cxr'.*prepare --dataset=csv --name=my_cxr"):
        registry.get("my_cxr", str(tmp_path))
    with pytest.raises(KeyError, match="prepare --dataset=csv"):
        registry.get("my_cxr")


def test_a_labelled_csv_prepared_by_name_trains_with_its_labels(tmp_path, bars):
    """Prepared under a name, a labelled CSV is what ``data.train=NAME`` reads: its batches
    hold the labels (the registry used to know no user dataset, nor their label names)."""
    path = _write_user_csv(tmp_path / "mine", _labelled_rows())
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("csv", str(path), data_dir, name="mine", label_names=NAMES)
    data = _data_config(data_dir, "mine")
    ds = pipeline.make_dataset(data, split="train", train=True, seed=0, batch_size=4)
    batch = next(iter(ds))
    assert batch["labels"].shape == (4, 3) and batch["skipped"] == 0
    # The first pass over the train split's rows 0, 1, 4 and 5: one-hot at k % 3.
    expected = [[0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert sorted(batch["labels"].tolist()) == expected
    assert batch["roi_mask"].sum() == 1  # row 0's box


def test_rows_of_one_image_are_all_kept_in_one_split(tmp_path, bars):
    """Two reports of one film without an ``id`` column are two records of one patient (they
    used to share an id); a repeated explicit id is a duplicate."""
    rows = [
        dict(image="film.png", caption="First read."),
        dict(image="film.png", caption="Second read."),
        dict(image="other.png", caption="Another film."),
    ]
    path = _write_user_csv(tmp_path / "mine", rows)
    summary = prepare.prepare("csv", str(path), str(tmp_path / "tfds"), name="mine")
    assert summary.skipped == {} and sum(summary.splits.values()) == 3
    split = schema.patient_split("film.png")
    source = registry.get("mine", str(tmp_path / "tfds")).data_source(split, _data_config(tmp_path))
    films = {_text(source[k]["id"]): _text(source[k]["report"]) for k in range(len(source))}
    assert {k: v for k, v in films.items() if k.startswith("film")} == {
        "film.png": "First read.", "film.png#2": "Second read."}  # fmt: skip
    explicit = [dict(row, id="same") for row in rows[:2]]
    path = _write_user_csv(tmp_path / "ids", explicit)
    summary = prepare.prepare("csv", str(path), str(tmp_path / "tfds2"), name="ids")
    assert sum(summary.splits.values()) == 1
    assert summary.skipped == {"duplicate id": 1}
    assert summary.examples["duplicate id"] == ["data.csv:3"]


def test_a_row_that_fails_before_its_split_is_known_is_counted_once(tmp_path, bars):
    """The build reads the file once per split; a row skipped before its split is read is
    skipped in each pass, and used to be counted three times."""
    rows = _labelled_rows(3)
    rows.append(dict(image="images/0000.png", caption="  ", id="blank", split="train"))
    rows.append(dict(image="images/0001.png", caption="Two labels.", labels=[1, 0], id="short"))
    path = _write_user_csv(tmp_path / "mine", rows)
    summary = prepare.prepare("csv", str(path), str(tmp_path / "tfds"), name="m", label_names=NAMES)
    assert summary.skipped == {"empty report": 1, "bad label": 1}
    assert summary.examples == {"empty report": ["blank"], "bad label": ["short"]}
    saved = json.loads((pathlib.Path(summary.folder) / "prepare_summary.json").read_text())
    assert saved["skipped"] == summary.skipped and saved["examples"] == summary.examples


def test_strict_stops_at_the_first_bad_row_naming_it(tmp_path):
    rows = [*_labelled_rows(3), dict(image="gone.png", caption="Lost film.", id="lost")]
    path = _write_user_csv(tmp_path / "mine", rows, missing=("gone.png",))
    with pytest.raises(schema.DataError, match="record 'lost': missing image: .*gone.png"):
        prepare.prepare(
            "csv", str(path), str(tmp_path / "tfds"), name="m", strict=True, show_progress=False
        )


def test_the_counting_pass_reads_no_image(tmp_path):
    rows = [
        dict(image="empty.png", caption="Zero bytes."),
        dict(image="gone.png", caption="No file."),
        dict(image="good.png", caption="Fine."),
    ]
    path = _write_user_csv(tmp_path / "mine", rows, missing=("gone.png",))
    (path.parent / "empty.png").write_bytes(b"")
    records = formats.READERS["csv"](path, count_only=True)
    assert [r["id"] for r in records] == ["empty.png", "good.png"]
    assert dict(records.counter.counts) == {"missing image": 1}
    # The build reads the images: the zero-byte one is skipped there.
    full = formats.READERS["csv"](path)
    assert [r["id"] for r in full] == ["good.png"]
    assert dict(full.counter.counts) == {"missing image": 1, "empty image": 1}


def test_summary_text_lists_each_split_and_reason_with_ids():
    summary = prepare.Summary(
        dataset="mine",
        folder="/d/csv/mine/1.0.0",
        splits={"train": 1234, "test": 5},
        skipped={"missing image": 1, "empty report": 2},
        repaired={},
        examples={"missing image": ["a.png"], "empty report": ["b", "c"]},
    )
    assert summary.text().splitlines() == [
        "prepared 'mine' in /d/csv/mine/1.0.0",
        "  train          1,234 records",
        "  test               5 records",
        "  skipped: 3 records:",
        "    empty report            2   e.g. b, c",
        "    missing image           1   e.g. a.png",
        "  repaired: 0 records",
    ]


def _prepare_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "region_medclip.prepare", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_command_line_prints_the_summary(tmp_path):
    rows = [*_labelled_rows(4), dict(image="gone.png", caption="Lost.", id="lost")]
    _write_user_csv(tmp_path / "my_cxr", rows, missing=("gone.png",))
    data_dir = f"--data_dir={tmp_path / 'tfds'}"
    result = _prepare_cli(
        "--dataset=csv", "--name=my_cxr", "--manual_dir=my_cxr/data.csv", data_dir,
        "--label_names=no finding, nodule,effusion", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared 'my_cxr' in " in result.stdout
    assert "  train              2 records" in result.stdout
    assert "    missing image           1   e.g. lost" in result.stdout
    assert "--config.data.train=my_cxr" in result.stdout
    assert registry.get("my_cxr", str(tmp_path / "tfds")).class_names() == list(NAMES)
    missing = _prepare_cli("--dataset=roco", "--manual_dir=absent/roco", data_dir, cwd=tmp_path)
    assert missing.returncode != 0 and "absent/roco does not exist" in missing.stderr


def test_a_model_of_a_users_dataset_finds_it_in_its_data_dir(tmp_path, bars):
    """``predict`` without ``--labels`` scores the run's dataset's findings, looked up in the
    run's ``data_dir`` (a user's dataset is known nowhere else)."""
    from region_medclip import api

    path = _write_user_csv(tmp_path / "mine", _labelled_rows(4))
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("csv", str(path), data_dir, name="mine", label_names=NAMES)
    config = micro_config.get_config(f"data_dir={data_dir}")
    config.data.train = config.data.eval = "mine"
    model = api.Model(config, {"logit_scale": np.zeros(())})  # no tower is run
    assert model.dataset_findings() == ["nodule", "effusion"]


def test_preparing_again_needs_overwrite_and_then_reads_the_new_file(tmp_path, bars):
    path = _write_user_csv(tmp_path / "mine", _labelled_rows())
    data_dir = str(tmp_path / "tfds")
    first = prepare.prepare("csv", str(path), data_dir, name="mine", label_names=NAMES)
    with pytest.raises(FileExistsError, match="'mine' is prepared already in .*--overwrite"):
        prepare.prepare("csv", str(path), data_dir, name="mine", label_names=NAMES)
    path = _write_user_csv(tmp_path / "mine", _labelled_rows(4))  # the file edited
    again = prepare.prepare(
        "csv", str(path), data_dir, name="mine", label_names=NAMES, overwrite=True
    )
    assert sum(again.splits.values()) == 4 != sum(first.splits.values())


def test_detection_runs_on_a_prepared_real_dataset_with_boxes(tmp_path, bars):
    """VinDr-CXR's fixture, prepared: its train split holds a cardiomegaly and an effusion
    box on one film and a film without findings. The evaluator finds its classes by name,
    scores every one, and has its two captions as lesion descriptions."""
    import flax
    import jax

    from region_medclip.evaluators import run
    from region_medclip.models import clip

    fixture = _fixture("vindr_cxr", tmp_path / "raw")
    data_dir = tmp_path / "tfds"
    prepare.prepare("vindr_cxr", str(fixture.root), str(data_dir))
    config = micro_config.get_config(f"data_dir={data_dir}")
    config.evals.det = dict(kind="detection", dataset="vindr_cxr", split="train", batch_size=8)
    model = clip.from_config(config.model)
    inputs = {k: np.zeros(v.shape, v.dtype) for k, v in clip.example_inputs(config.data).items()}
    params = model.init(jax.random.key(0), **inputs)["params"]
    out = run.evaluate(config, model, flax.linen.meta.unbox(params), names=["det"])["det"]
    assert out["examples"] == 2 and out["lesion/queries"] == 2
    names = [n for n in registry.get("vindr_cxr").class_names() if not n.startswith("no ")]
    for name in names:
        assert f"ap@0.4/{name}" in out
    assert 0.0 <= out["map@0.4"] <= 1.0 and 0.0 <= out["froc/score"] <= 1.0
    assert 0.0 <= out["lesion/films_R@1"] <= 1.0
