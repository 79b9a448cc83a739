"""TFDS builders: the real datasets' array_record files built from each dataset's fixture
(tests/formats_fixtures) and read back with ``as_data_source`` — no TensorFlow involved — and
``synth_cxr``'s builds: the same bytes in every process, rendered on every core with JAX loaded,
and built once when several processes start on an empty data directory."""

import io
import pathlib
import subprocess
import sys

import formats_fixtures as ff
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from region_medclip.data import formats, schema, synth
from region_medclip.data.builders import real
from region_medclip.data.synth import builder as synth_cxr
from region_medclip.data.synth import parallel

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
    with pytest.raises(ValueError, match="num=4: the .* split gets no films"):
        synth_cxr.ensure_built(str(tmp_path), size=32, num=4, seed=0)


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """A fresh interpreter running ``code`` (own hash seeds: what a second build would see)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _files(data_dir: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_synth_builds_are_the_same_bytes_in_every_process(tmp_path):
    """The CLI and a second process build byte-identical files (the examples' protobuf maps
    used to be written in each process's own hash order)."""
    sheet = tmp_path / "sheet.png"
    cli = [sys.executable, "-m", "region_medclip.data.synth", f"--out={tmp_path / 'a'}"]
    cli += ["--num=160", "--size=32", "--seed=0", f"--sheet={sheet}"]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "built synth_cxr/32_n160/1.2.0" in first.stdout and sheet.exists()
    code = "import sys; from region_medclip.data.synth import builder as b; "
    code += "b.ensure_built(sys.argv[1], size=32, num=160, seed=0)"
    _finish(_python(code, str(tmp_path / "b")))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and any(".array_record-" in name for name in a)
    assert [name for name in a if a[name] != b[name]] == []


@pytest.mark.slow
def test_synth_parallel_rendering_keeps_the_order_with_jax_loaded():
    import jax.numpy as jnp

    jnp.zeros(2).block_until_ready()  # JAX's runtime threads are running: no fork is safe
    indices = list(range(7, 7 + 3 * (parallel.MIN_PARALLEL + 10), 3))
    got = list(parallel.render_records(indices, size=16, seed=2, workers=3))
    assert [r["id"] for r in got] == [f"synth-2-{i:07d}" for i in indices]
    for i, record in zip(indices, got, strict=True):
        expected = synth.render_record(i, size=16, seed=2)
        np.testing.assert_array_equal(record["image"], expected["image"])
        np.testing.assert_array_equal(record["boxes"], expected["boxes"])
        assert record["report"] == expected["report"]
        assert record["box_captions"] == expected["box_captions"]


@pytest.mark.slow
def test_synth_render_worker_failure_is_an_error():
    with pytest.raises(RuntimeError, match="render worker .* exited with status 1"):
        list(parallel.render_records(range(parallel.MIN_PARALLEL), size=16, seed=-1, workers=2))


@pytest.mark.slow
def test_synth_render_workers_import_neither_jax_nor_tfds():
    code = "import sys; from region_medclip.data.synth import parallel; "
    code += "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'tensorflow_datasets') "
    code += "if m in sys.modules))"
    assert _finish(_python(code)).strip() == "[]"


# Each process: imports, waits until all are ready, then asks the registry for the source (the
# first use builds) and prints its build log lines and a digest of the records it reads.
_FIRST_USE = """
import hashlib, logging, pathlib, sys, time
import ml_collections
from region_medclip.data import registry
log = logging.getLogger("region_medclip.data.synth")
log.addHandler(logging.StreamHandler(sys.stdout))
log.setLevel(logging.INFO)
data_dir, rank, count = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(data_dir.parent / f"ready-{rank}").touch()
while len(list(data_dir.parent.glob("ready-*"))) < count:
    time.sleep(0.01)
config = ml_collections.ConfigDict(
    dict(data_dir=str(data_dir), image_size=32, synth=dict(num=160, seed=0)))
source = registry.get("synth_cxr").data_source("train", config)
digest = hashlib.sha256()
for k in range(len(source)):
    example = source[k]
    digest.update(repr((example["id"], example["report"])).encode() + example["image"].tobytes())
print("digest", len(source), digest.hexdigest())
"""


@pytest.mark.slow
def test_synth_first_use_from_several_processes_builds_once(tmp_path):
    data_dir, count = tmp_path / "tfds", 3
    procs = [_python(_FIRST_USE, str(data_dir), str(k), str(count)) for k in range(count)]
    outs = [_finish(proc) for proc in procs]
    builds = [line for out in outs for line in out.splitlines() if "synth_cxr: building" in line]
    assert len(builds) == 1, outs
    digests = {line for out in outs for line in out.splitlines() if line.startswith("digest")}
    assert len(digests) == 1, outs
    train = synth_cxr.builder(data_dir, 32, 160).info.splits["train"].num_examples
    assert next(iter(digests)).split()[1] == str(train) and train > 100
    versions = [p.name for p in (data_dir / "synth_cxr" / "32_n160").iterdir()]
    assert versions == ["1.2.0"]  # no half-built "incomplete.*" directory left behind
