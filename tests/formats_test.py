"""Raw-format readers on fixtures written in each dataset's exact layout (formats_fixtures)."""

import csv
import gzip
import io
import json
import logging
import random

import formats_fixtures as ff
import numpy as np
import PIL.Image
import pytest

from region_medclip.data import formats, schema

NAMES = list(formats.READERS)


def read(name, fixture, **kwargs):
    records = formats.READERS[name](fixture.root, **fixture.options, **kwargs)
    return records, {record["id"]: record for record in records}


def rewrite_csv(path, edit_fn):
    """Applies ``edit_fn(header, rows) -> (header, rows)`` to a CSV (gzip kept)."""
    data = path.read_bytes()
    gz = path.name.endswith(".gz")
    text = (gzip.decompress(data) if gz else data).decode()
    lines = list(csv.reader(io.StringIO(text)))
    header, rows = edit_fn(lines[0], lines[1:])
    ff.write_csv(path, header, rows, gz=gz)


def drop_column(path, column):
    def edit(header, rows):
        keep = [i for i, name in enumerate(header) if name != column]
        return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]

    rewrite_csv(path, edit)


@pytest.mark.parametrize("name", NAMES)
def test_records_follow_the_schema(name, tmp_path):
    fixture = ff.WRITERS[name](tmp_path)
    records, by_id = read(name, fixture)
    assert set(by_id) == set(fixture.images)
    assert records.counter.total == 0
    num_labels = fixture.options.get("num_labels") or len(formats.LABEL_NAMES[name])
    for record in by_id.values():
        assert set(record) == {"image", "report", "labels", "boxes", "box_captions",
                               "box_labels", "id", "patient_id", "split"}  # fmt: skip
        if isinstance(record["image"], bytes):
            image = np.asarray(PIL.Image.open(io.BytesIO(record["image"])))
            assert record["image"] == fixture.images[record["id"]].read_bytes()
        else:
            image = record["image"]
            assert image.dtype == np.uint8 and image.ndim == 2
        height, width = image.shape[:2]
        assert isinstance(record["report"], str) and record["report"].strip()
        assert record["labels"].dtype == np.float32 and record["labels"].shape == (num_labels,)
        assert np.isin(record["labels"], [-1.0, 0.0, 1.0]).all()
        boxes = record["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape == (len(record["box_captions"]), 4)
        assert record["box_labels"].dtype == np.int32 and len(record["box_labels"]) == len(boxes)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
        assert (boxes[:, [1, 3]] <= height).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert record["split"] in schema.SPLITS and record["patient_id"]


def _break_image(path, case):
    data = path.read_bytes()
    if case == "corrupt":
        path.write_bytes(data[: len(data) // 4] + b"\x00not an image" * 40)
    elif case == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif case == "zero-byte":
        path.write_bytes(b"")
    else:
        path.unlink()


REASONS = {"corrupt": "unreadable image", "truncated": "unreadable image",
           "zero-byte": "empty image", "missing": "missing image"}  # fmt: skip


@pytest.mark.parametrize("case", list(REASONS))
@pytest.mark.parametrize("name", NAMES)
def test_bad_image_is_skipped_counted_and_named(name, case, tmp_path, caplog):
    fixture = ff.WRITERS[name](tmp_path)
    bad_id, bad_path = next(iter(fixture.images.items()))
    _break_image(bad_path, case)
    with caplog.at_level(logging.WARNING, logger="region_medclip.data"):
        records, by_id = read(name, fixture)
    assert set(by_id) == set(fixture.images) - {bad_id}
    assert dict(records.counter.counts) == {REASONS[case]: 1}
    assert any(repr(bad_id) in message and REASONS[case] in message
               for message in caplog.messages)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_strict_mode_raises_on_the_bad_record(name, tmp_path):
    fixture = ff.WRITERS[name](tmp_path)
    bad_id, bad_path = next(iter(fixture.images.items()))
    _break_image(bad_path, "corrupt")
    with pytest.raises(schema.DataError, match=bad_id):
        list(formats.READERS[name](fixture.root, strict=True, **fixture.options))


# name → (file to delete, (file, column) to drop), relative to the fixture root.
BROKEN_SOURCES = {
    "mimic_cxr": ("mimic-cxr-2.0.0-chexpert.csv.gz", ("mimic-cxr-2.0.0-split.csv.gz", "split")),
    "ms_cxr": ("MS_CXR_Local_Alignment_v1.1.0.csv",
               ("MS_CXR_Local_Alignment_v1.1.0.csv", "label_text")),
    "chexpert": ("valid.csv", ("train.csv", "Cardiomegaly")),
    "rsna_pneumonia": ("stage_2_train_labels.csv", ("stage_2_train_labels.csv", "Target")),
    "vindr_cxr": ("annotations/annotations_train.csv",
                  ("annotations/annotations_train.csv", "class_name")),
    "chestxray14": ("Data_Entry_2017.csv", ("Data_Entry_2017.csv", "Finding Labels")),
    "roco": ("test/radiology/radiologytestdata.csv",
             ("validation/radiology/radiologyvaldata.csv", "caption")),
    "csv": ("data.csv", ("data.csv", "caption")),
}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_missing_file_is_a_clear_error(name, tmp_path):
    fixture = ff.WRITERS[name](tmp_path)
    missing, _ = BROKEN_SOURCES[name]
    (fixture.root / missing).unlink()
    # Raised at the call, before any iteration: a long run fails at once, not mid-epoch.
    with pytest.raises(schema.DataError, match=missing.split("/")[-1].split(".")[0]):
        formats.READERS[name](fixture.root, **fixture.options)


@pytest.mark.parametrize("name", NAMES)
def test_missing_column_is_a_clear_error_naming_file_and_column(name, tmp_path):
    fixture = ff.WRITERS[name](tmp_path)
    _, (path, column) = BROKEN_SOURCES[name]
    drop_column(fixture.root / path, column)
    with pytest.raises(schema.DataError) as error:
        formats.READERS[name](fixture.root, **fixture.options)
    assert path.split("/")[-1] in str(error.value) and repr(column) in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_missing_root_is_a_clear_error(name, tmp_path):
    with pytest.raises(schema.DataError, match="does not exist"):
        formats.READERS[name](tmp_path / "nowhere")


def test_split_filter_reads_no_image_of_other_splits(tmp_path):
    fixture = ff.write_chestxray14(tmp_path)
    _break_image(fixture.images["00000001_000.png"], "corrupt")  # a train image
    records, by_id = read("chestxray14", fixture, split="test")
    assert list(by_id) == ["00000003_000.png"] and records.counter.total == 0
    with pytest.raises(schema.DataError, match="split"):
        formats.READERS["chestxray14"](fixture.root, split="valid")


# --- MIMIC-CXR-JPG and MS-CXR ---------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mimic_cxr_splits_labels_and_reports(tmp_path, gz):
    _, by_id = read("mimic_cxr", ff.write_mimic_cxr(tmp_path, gz=gz))
    assert {i: r["split"] for i, r in by_id.items()} == {
        "d1": "train", "d2": "train", "d3": "validation", "d4": "test"}  # fmt: skip
    assert by_id["d1"]["patient_id"] == "10000001"
    labels = dict(zip(formats.CHEXPERT_LABELS, by_id["d1"]["labels"], strict=True))
    assert labels["Cardiomegaly"] == 1 and labels["Edema"] == -1
    assert labels["Pleural Effusion"] == 0 and labels["Pneumonia"] == 0  # blank → 0
    assert not by_id["d4"]["labels"].any()  # study absent from the chexpert file
    assert by_id["d1"]["report"] == (
        "FINDINGS: The heart is mildly enlarged. No pleural effusion.\n"
        "IMPRESSION: Mild cardiomegaly."
    )


def test_mimic_cxr_views_and_nan_labels(tmp_path):
    fixture = ff.write_mimic_cxr(tmp_path)
    rewrite_csv(fixture.root / "mimic-cxr-2.0.0-chexpert.csv.gz",
                lambda h, rows: (h, [[*r[:3], "NaN", *r[4:]] for r in rows]))  # fmt: skip
    _, by_id = read("mimic_cxr", fixture, views=("PA", "AP"))
    assert sorted(by_id) == ["d1", "d3", "d4"]  # d2 is LATERAL
    assert by_id["d1"]["labels"][formats.CHEXPERT_LABELS.index("Atelectasis")] == 0


def test_mimic_cxr_empty_and_missing_reports_are_skipped(tmp_path, caplog):
    fixture = ff.write_mimic_cxr(tmp_path)
    study = fixture.images["d3"].parent
    study.with_suffix(".txt").write_text("  FINAL REPORT\n INDICATION: cough\n FINDINGS:\n\n")
    (fixture.images["d4"].parent.with_suffix(".txt")).unlink()
    records, by_id = read("mimic_cxr", fixture)
    assert sorted(by_id) == ["d1", "d2"]
    assert dict(records.counter.counts) == {"empty report": 1, "missing report": 1}
    assert any("'d3'" in m for m in caplog.messages)


def test_report_sections():
    text = "WET READ: x\n FINDINGS AND IMPRESSION:  Lungs  clear.\n\nNOTIFICATION: called"
    assert formats.report_sections(text) == "FINDINGS AND IMPRESSION: Lungs clear."
    assert formats.report_sections("IMPRESSION: None.\nFINDINGS:\n") == "IMPRESSION: None."
    assert formats.report_sections("No headers at all.") == ""


def test_ms_cxr_boxes_captions_and_labels(tmp_path):
    records, by_id = read("ms_cxr", ff.write_ms_cxr(tmp_path))
    a1, b2 = by_id["a1"], by_id["b2"]
    # xywh → xyxy; the second box (20 + 40 > 48 wide, 20 + 30 > 40 high) is clipped.
    np.testing.assert_allclose(a1["boxes"], [[30, 2, 40, 10], [20, 20, 48, 40]])
    assert a1["box_captions"] == ["Small left apical pneumothorax", "Enlarged heart"]
    assert a1["box_labels"].tolist() == [formats.MS_CXR_LABELS.index("Pneumothorax"),
                                         formats.MS_CXR_LABELS.index("Cardiomegaly")]  # fmt: skip
    assert a1["labels"].sum() == 2 and a1["split"] == "train" and a1["patient_id"] == "10000001"
    assert a1["report"] == "Small left apical pneumothorax. Enlarged heart."
    # b2's JPEG is stored at half the CSV's image_width × image_height: boxes follow it.
    np.testing.assert_allclose(b2["boxes"], [[2, 5, 8, 15]])
    assert b2["split"] == "validation"
    assert records.counter.repairs == {"clipped box": 1}


def test_ms_cxr_degenerate_box_is_dropped_with_its_caption(tmp_path):
    fixture = ff.write_ms_cxr(tmp_path)
    path = fixture.root / "MS_CXR_Local_Alignment_v1.1.0.csv"
    rewrite_csv(path, lambda h, rows: (h, [r[:6] + ["0"] + r[7:] if r[1] == "Cardiomegaly"
                                           else r for r in rows]))  # fmt: skip
    records, by_id = read("ms_cxr", fixture)
    assert by_id["a1"]["box_captions"] == ["Small left apical pneumothorax"]
    assert records.counter.repairs == {"clipped box": 1, "dropped box": 1}


# --- CheXpert and the 5x200 subset -----------------------------------------------------------


def test_chexpert_labels_splits_and_synthesised_reports(tmp_path):
    fixture = ff.write_chexpert(tmp_path)
    _, by_id = read("chexpert", fixture)
    first = by_id["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert first["report"] == "Findings: cardiomegaly. Possible edema. No pleural effusion."
    assert first["patient_id"] == "patient00001" and first["split"] == "train"
    valid = by_id["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"]
    assert valid["split"] == "validation" and valid["report"] == "Findings: atelectasis. No edema."
    _, frontal = read("chexpert", fixture, frontal_only=True)
    assert len(frontal) == 3 and all("frontal" in key for key in frontal)


def test_chexpert_nan_and_unparseable_labels(tmp_path):
    fixture = ff.write_chexpert(tmp_path)
    column = ff.CHEXPERT_HEADER.index("Edema")
    rewrite_csv(fixture.root / "train.csv", lambda h, rows: (h, [
        [*r[:column], "nan" if i == 0 else "abc" if i == 1 else r[column], *r[column + 1:]]
        for i, r in enumerate(rows)]))  # fmt: skip
    records, by_id = read("chexpert", fixture)
    first = by_id["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert first["labels"][formats.CHEXPERT_LABELS.index("Edema")] == 0
    assert len(by_id) == 3 and dict(records.counter.counts) == {"bad label": 1}


def _labels(**values):
    labels = np.zeros(len(formats.CHEXPERT_LABELS), np.float32)
    for name, value in values.items():
        labels[formats.CHEXPERT_LABELS.index(name.replace("_", " "))] = value
    return labels


def test_select_5x200_is_exclusive_and_deterministic():
    candidates = []
    for index in range(40):
        name = formats.COMPETITION_LABELS[index % 5].replace(" ", "_")
        candidates.append(dict(id=f"ok{index}", labels=_labels(**{name: 1.0}), split="train"))
    candidates += [
        dict(id="two", labels=_labels(Edema=1, Cardiomegaly=1), split="train"),
        dict(id="uncertain", labels=_labels(Edema=1, Atelectasis=-1), split="train"),
        dict(id="other", labels=_labels(Edema=1, Pneumonia=1), split="train"),
        dict(id="nofinding", labels=_labels(Edema=1, No_Finding=1), split="train"),
    ]
    selected = formats.select_5x200(candidates, per_class=3)
    assert len(selected) == 15 and all(r["split"] == "test" for r in selected)
    assert {"two", "uncertain", "other"}.isdisjoint(r["id"] for r in selected)
    for index, name in enumerate(formats.COMPETITION_LABELS):
        group = selected[3 * index : 3 * index + 3]
        assert all(r["labels"][formats.CHEXPERT_LABELS.index(name)] == 1 for r in group)
    shuffled = random.Random(0).sample(candidates, len(candidates))
    assert [r["id"] for r in formats.select_5x200(shuffled, per_class=3)] == [
        r["id"] for r in selected]  # fmt: skip
    assert [r["id"] for r in formats.select_5x200(candidates, per_class=3, seed=1)] != [
        r["id"] for r in selected]  # fmt: skip


# --- RSNA, VinDr-CXR, ChestX-ray14 -------------------------------------------------------------


def test_rsna_dicom_boxes_and_monochrome1(tmp_path):
    records, by_id = read("rsna_pneumonia", ff.write_rsna_pneumonia(tmp_path))
    two = by_id["p-two"]
    np.testing.assert_allclose(two["boxes"], [[2, 4, 12, 16], [20, 4, 30, 32]])  # 2nd clipped
    assert two["box_captions"] == ["pneumonia"] * 2 and two["labels"].tolist() == [1.0]
    assert by_id["p-none"]["boxes"].shape == (0, 4) and by_id["p-none"]["labels"][0] == 0
    assert by_id["p-none"]["report"] == "Abnormal study without lung opacity. No pneumonia."
    # The 12-bit ramp stretches to 0..255; MONOCHROME1 is inverted so dense stays bright.
    assert two["image"][0, 0] == 0 and two["image"][0, -1] == 255
    assert by_id["p-mono1"]["image"][0, 0] == 255 and by_id["p-mono1"]["image"][0, -1] == 0
    none = by_id["p-none"]["image"]  # decoded from the JPEG-baseline transfer syntax
    assert none.shape == (32, 40) and none[0, 0] < 8 and none[0, -1] > 247
    assert all(r["split"] == schema.patient_split(i) for i, r in by_id.items())
    assert records.counter.repairs == {"clipped box": 1}


def test_vindr_boxes_labels_and_png_exports(tmp_path):
    records, by_id = read("vindr_cxr", ff.write_vindr_cxr(tmp_path))
    a = by_id["img-a"]
    np.testing.assert_allclose(a["boxes"], [[10, 20, 30, 28], [0, 25, 12, 32]])
    assert a["box_captions"] == ["cardiomegaly", "pleural effusion"]  # the ILD box is degenerate
    index = formats.VINDR_LABELS.index
    assert a["box_labels"].tolist() == [index("Cardiomegaly"), index("Pleural effusion")]
    positive = {formats.VINDR_LABELS[i] for i in np.flatnonzero(a["labels"])}
    assert positive == {"Cardiomegaly", "Pleural effusion", "ILD", "Lung tumor"}
    assert a["report"] == "Findings: cardiomegaly, ILD, pleural effusion, lung tumor."
    assert isinstance(by_id["img-b"]["image"], bytes) and by_id["img-b"]["boxes"].shape == (0, 4)
    assert by_id["img-b"]["report"] == "No acute findings." and by_id["img-c"]["split"] == "test"
    assert records.counter.repairs == {"clipped box": 1, "dropped box": 1}


def test_vindr_unparseable_coordinate_skips_the_row(tmp_path):
    fixture = ff.write_vindr_cxr(tmp_path)
    path = fixture.root / "annotations/annotations_train.csv"
    rewrite_csv(path, lambda h, rows: (h, [[*rows[0][:3], "abc", *rows[0][4:]], *rows[1:]]))
    records, by_id = read("vindr_cxr", fixture)
    assert sorted(by_id) == ["img-b", "img-c"] and dict(records.counter.counts) == {"bad row": 1}


def test_chestxray14_boxes_labels_and_splits(tmp_path):
    _, by_id = read("chestxray14", ff.write_chestxray14(tmp_path))
    first = by_id["00000001_000.png"]
    np.testing.assert_allclose(first["boxes"], [[10.5, 12.25, 30.5, 27.25]])
    assert first["box_captions"] == ["cardiomegaly"] and first["report"] == (
        "Findings: cardiomegaly, effusion.")  # fmt: skip
    assert by_id["00000002_000.png"]["box_captions"] == ["infiltration"]  # "Infiltrate" alias
    assert by_id["00000001_001.png"]["report"] == "No acute findings."
    assert not by_id["00000001_001.png"]["labels"].any()
    assert by_id["00000003_000.png"]["split"] == "test"
    assert by_id["00000003_000.png"]["box_captions"] == []
    assert {r["split"] for i, r in by_id.items() if i != "00000003_000.png"} <= {
        "train", "validation"}  # fmt: skip
    assert by_id["00000001_000.png"]["split"] == by_id["00000001_001.png"]["split"]  # patient


# --- ROCO and the generic CSV / JSONL ------------------------------------------------------------


def test_roco_splits_captions_and_empty_caption(tmp_path):
    fixture = ff.write_roco(tmp_path)
    _, by_id = read("roco", fixture)
    assert [r["split"] for r in by_id.values()] == ["train", "validation", "test"]
    assert by_id["ROCO_00000"]["report"] == "CT scan showing a mass in case 0."
    assert by_id["ROCO_00000"]["patient_id"] == "PMC400"
    rewrite_csv(fixture.root / "test/radiology/radiologytestdata.csv",
                lambda h, rows: (h, [[*rows[0][:2], "  "]]))  # fmt: skip
    records, by_id = read("roco", fixture)
    assert len(by_id) == 2 and dict(records.counter.counts) == {"empty report": 1}


@pytest.mark.parametrize("jsonl", [False, True])
def test_generic_csv_and_jsonl(tmp_path, jsonl):
    fixture = ff.write_generic(tmp_path, jsonl=jsonl)
    records, by_id = read("csv", fixture)
    a, b, c = by_id["imgs/a.png"], by_id["imgs/b.jpg"], by_id["imgs/c.png"]
    np.testing.assert_allclose(a["boxes"], [[1, 2, 11, 12]])
    assert a["box_captions"] == ["right upper lobe nodule"] and a["box_labels"].tolist() == [0]
    assert b["labels"].tolist() == [0, 0] and b["split"] == "validation"  # null label → 0
    np.testing.assert_allclose(c["boxes"], [[30, 30, 48, 40]])  # clipped; degenerate dropped
    assert c["box_captions"] == ["left effusion"] and c["box_labels"].tolist() == [-1]
    assert records.counter.repairs == {"clipped box": 1, "dropped box": 1}
    # The file itself (not its folder) works as the root too.
    assert len(list(formats.READERS["csv"](fixture.root / ("data.jsonl" if jsonl else "data.csv"))))


def test_generic_bad_rows_are_skipped(tmp_path):
    fixture = ff.write_generic(tmp_path, jsonl=True)
    path = fixture.root / "data.jsonl"
    bad = [
        "{not json",
        json.dumps(dict(image="imgs/a.png", caption="", labels=[1, 0])),
        json.dumps(dict(image="imgs/a.png", caption="x", split="dev", id="s")),
        json.dumps(dict(image="imgs/a.png", caption="x", labels=[1], id="l")),
        json.dumps(dict(image="imgs/a.png", caption="x", boxes=[[1, 2, 3]], box_captions=["y"])),
        json.dumps(dict(image="imgs/a.png", caption="x", boxes=[[1, 2, 3, 4]], id="n")),
    ]
    path.write_text(path.read_text() + "\n".join(bad) + "\n")
    records, by_id = read("csv", fixture)
    assert len(by_id) == 3
    assert dict(records.counter.counts) == {"bad row": 2, "empty report": 1, "bad split": 1,
                                            "bad label": 1, "bad boxes": 1}  # fmt: skip
