"""TFDS builders of the real datasets: array_record files built from each dataset's fixture
(tests/formats_fixtures) and read back with ``as_data_source`` — no TensorFlow involved."""

import io

import formats_fixtures as ff
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from region_medclip.data import formats, schema
from region_medclip.data.builders import real

NAMES = list(real.BUILDERS)


def text(value):
    """TFDS Text features read back as bytes."""
    return value.decode() if isinstance(value, bytes) else value


def build(name, tmp_path, fixture=None, **kwargs):
    """Builds ``name`` from its fixture (or ``fixture``) and returns ``(builder, sources)``."""
    fixture = fixture or ff.WRITERS[name](tmp_path / "raw")
    builder = real.BUILDERS[name](data_dir=tmp_path / "tfds", file_format="array_record", **kwargs)
    config = tfds.download.DownloadConfig(manual_dir=str(fixture.root))
    builder.download_and_prepare(download_config=config)
    return builder, builder.as_data_source()


def _expected_splits(name, tmp_path):
    fixture = ff.WRITERS[name](tmp_path / "expected")
    options = dict(fixture.options)
    records = formats.READERS[name](fixture.root, verify_images=False, **options)
    counts = {}
    for record in records:
        counts[record["split"]] = counts.get(record["split"], 0) + 1
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_reads_back(name, tmp_path):
    kwargs = {}
    if name == "csv":
        kwargs["config"] = real.CsvConfig(name="mine", num_labels=2)
    builder, sources = build(name, tmp_path, **kwargs)
    expected = _expected_splits(name, tmp_path)
    # Splits without records are left out (TFDS cannot write an empty split).
    assert {split: len(source) for split, source in sources.items()} == expected
    assert builder.info.metadata["skipped"] == {}
    example = sources[next(iter(expected))][0]
    image = np.asarray(PIL.Image.open(io.BytesIO(example["image"])))  # PNG for DICOM sources
    assert image.dtype == np.uint8 and image.ndim == 2
    assert example["labels"].dtype == np.float32
    assert example["labels"].shape == (builder.info.features["labels"].shape[0],)
    assert example["boxes"].shape[1:] == (4,) and example["boxes"].dtype == np.float32
    assert len(example["box_captions"]) == len(example["box_labels"]) == len(example["boxes"])
    assert text(example["split"]) in schema.SPLITS
    assert text(example["report"]).strip()


def test_example_values_survive_the_round_trip(tmp_path):
    _, sources = build("ms_cxr", tmp_path)
    example = sources["train"][0]
    assert text(example["id"]) == "a1" and text(example["patient_id"]) == "10000001"
    np.testing.assert_allclose(example["boxes"], [[30, 2, 40, 10], [20, 20, 48, 40]])
    captions = [text(caption) for caption in example["box_captions"]]
    assert captions == ["Small left apical pneumothorax", "Enlarged heart"]
    assert example["image"] == (tmp_path / "raw/mimic-cxr-jpg/files/p10/p10000001/s50000001/"
                                "a1.jpg").read_bytes()  # fmt: skip


def test_skipped_records_are_counted_in_the_metadata(tmp_path):
    fixture = ff.write_roco(tmp_path / "raw")
    fixture.images["ROCO_00000"].write_bytes(b"")
    builder, sources = build("roco", tmp_path, fixture=fixture)
    assert "train" not in sources  # its only record was skipped
    assert builder.info.metadata["skipped"] == {"empty image": 1}
    reloaded = real.BUILDERS["roco"](data_dir=tmp_path / "tfds")
    assert reloaded.info.metadata["skipped"] == {"empty image": 1}


def test_strict_build_fails_on_a_bad_record(tmp_path):
    fixture = ff.write_roco(tmp_path / "raw")
    fixture.images["ROCO_00001"].write_bytes(b"junk")
    with pytest.raises(schema.DataError, match="ROCO_00001"):
        build("roco", tmp_path, fixture=fixture, strict=True)


def test_no_readable_record_is_a_clear_error(tmp_path):
    fixture = ff.write_roco(tmp_path / "raw")
    for path in fixture.images.values():
        path.unlink()
    with pytest.raises(schema.DataError, match="no readable records"):
        build("roco", tmp_path, fixture=fixture)


def test_chexpert_5x200_config(tmp_path):
    fixture = ff.write_chexpert(tmp_path / "raw")
    config = real.ChexpertConfig(name="5x200_small", subset="5x200", per_class=1)
    with pytest.raises(schema.DataError, match="no 5x200 candidates"):
        build("chexpert", tmp_path, fixture=fixture, config=config)  # Edema −1 disqualifies
    edema = ff.CHEXPERT_HEADER.index("Edema")
    rows = (fixture.root / "train.csv").read_text().splitlines()
    cells = rows[1].split(",")
    rows[1] = ",".join([*cells[:edema], "", *cells[edema + 1 :]])
    (fixture.root / "train.csv").write_text("\n".join(rows) + "\n")
    _, sources = build("chexpert", tmp_path, fixture=fixture, config=config)
    assert list(sources) == ["test"] and len(sources["test"]) == 1
    example = sources["test"][0]
    assert text(example["id"]) == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert text(example["split"]) == "test"


def test_csv_config_path_needs_no_manual_dir(tmp_path):
    fixture = ff.write_generic(tmp_path / "raw", jsonl=True)
    config = real.CsvConfig(name="own", path=str(fixture.root / "data.jsonl"), num_labels=2)
    builder = real.Csv(config=config, data_dir=tmp_path / "tfds", file_format="array_record")
    builder.download_and_prepare()
    assert {split: len(s) for split, s in builder.as_data_source().items()} == {
        "train": 1, "validation": 1, "test": 1}  # fmt: skip


def test_registered_names_load_with_data_source(tmp_path):
    build("roco", tmp_path)
    source = tfds.data_source("roco", split="validation", data_dir=tmp_path / "tfds")
    assert len(source) == 1 and text(source[0]["id"]) == "ROCO_00001"


def test_synth_too_small_for_a_split_is_a_clear_error(tmp_path):
    from region_medclip.data.builders import synth_cxr

    with pytest.raises(ValueError, match="num=4: the .* split gets no films"):
        synth_cxr.ensure_built(str(tmp_path), size=32, num=4, seed=0)
