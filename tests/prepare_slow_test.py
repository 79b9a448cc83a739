"""README's "Train on your own data", command for command: its four ``python -m`` lines are read
from README.md (so this breaks when they change) and run in new processes, in a folder holding
``my_cxr/data.csv``, with only the flags a test needs appended (a private data directory, four
steps of eight films). The CSV mixes PNG, JPEG, 16-bit PNG and RGB synth_cxr films, some with
boxes, and one bad row of each kind the summary must name."""

import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from micro_config import ROOT

from region_medclip import checkpointing
from region_medclip.data import synth

pytestmark = pytest.mark.slow

SECTION = "## Train on your own data"
COLUMNS = ["id", "image", "caption", "labels", "boxes", "box_captions", "split"]
LABEL_OF = {"no finding": "no finding", "nodule": "nodule", "effusion": "pleural effusion"}
SPLITS = {"train": 32, "validation": 8, "test": 8}
# id → (reason in the summary, what is wrong with its row)
BAD = {
    "bad-missing": "missing image",
    "bad-empty": "empty image",
    "bad-truncated": "unreadable image",
    "bad-caption": "empty report",
    "bad-boxes": "bad row",
    "bad-labels": "bad label",
}


def readme_commands() -> list[list[str]]:
    """The ``python -m`` lines of README's bash block in :data:`SECTION`, as argv lists."""
    text = pathlib.Path(ROOT, "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md: no bash block in {SECTION!r}"
    lines = [line for line in block.group(1).splitlines() if line.startswith("python -m ")]
    return [shlex.split(line) for line in lines]


def _encoded(film: np.ndarray, kind: str) -> tuple[str, bytes]:
    """``film`` (uint8 ``[H, W]``) as a file of ``kind``: its suffix and bytes."""
    image = {
        "png": film,
        "jpeg": film,
        "png16": film.astype(np.uint16) * 257,
        "rgb": np.repeat(film[..., None], 3, axis=-1),
    }[kind]
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG" if kind == "jpeg" else "PNG")
    return (".jpg" if kind == "jpeg" else ".png"), buffer.getvalue()


def _good_rows(folder: pathlib.Path) -> list[dict]:
    """48 synth_cxr films over the splits, PNG / JPEG / 16-bit PNG / RGB in turn (the first,
    ``images/0001.png``, a PNG); every other one with its boxes."""
    rows, splits = [], [s for s, count in SPLITS.items() for _ in range(count)]
    for k, split in enumerate(splits):
        record = synth.render_record(k, size=96, seed=0)
        suffix, data = _encoded(record["image"], ("png", "jpeg", "png16", "rgb")[k % 4])
        image = f"images/{k + 1:04d}{suffix}"
        (folder / image).write_bytes(data)
        labels = [float(record["labels"][synth.LABELS.index(n)]) for n in LABEL_OF.values()]
        row = dict(id=f"cxr{k + 1:04d}", image=image, caption=record["report"], labels=labels)
        if k % 2 == 0:
            row.update(boxes=record["boxes"].tolist(), box_captions=record["box_captions"])
        rows.append(dict(row, split=split))
    return rows


def _bad_rows(folder: pathlib.Path) -> list[dict]:
    """One row of each kind in :data:`BAD`."""
    _, jpeg = _encoded(synth.render_record(99, size=96, seed=0)["image"], "jpeg")
    (folder / "images/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "images/empty.png").write_bytes(b"")
    good = dict(image="images/0001.png", caption="Clear lungs.", labels=[1, 0, 0], split="train")
    return [
        dict(good, id="bad-missing", image="images/missing.png"),
        dict(good, id="bad-empty", image="images/empty.png"),
        dict(good, id="bad-truncated", image="images/truncated.jpg", split="test"),
        dict(good, id="bad-caption", caption=" "),
        dict(good, id="bad-boxes", boxes="[[1, 2, 30", box_captions=["nodule"]),
        dict(good, id="bad-labels", labels=[1, 0], split="validation"),
    ]


def write_my_cxr(cwd: pathlib.Path) -> None:
    """``cwd/my_cxr/data.csv`` and its images, good rows and bad ones interleaved."""
    import formats_fixtures as ff

    folder = cwd / "my_cxr"
    (folder / "images").mkdir(parents=True)
    rows = _good_rows(folder)
    for k, bad in enumerate(_bad_rows(folder)):
        rows.insert(7 * k + 3, bad)
    cells = [
        [row.get(c, "") if isinstance(row.get(c, ""), str) else json.dumps(row[c]) for c in COLUMNS]
        for row in rows
    ]
    ff.write_csv(folder / "data.csv", COLUMNS, cells)


def _run(argv: list[str], *extra: str, cwd: pathlib.Path) -> str:
    """Runs README's ``python -m ...`` line with ``extra`` flags; returns its stdout."""
    assert argv[:2] == ["python", "-m"], argv
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, *argv[1:], *extra]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def test_readme_train_on_your_own_data(tmp_path):
    commands = readme_commands()
    modules = [argv[2] for argv in commands]
    assert modules == [f"region_medclip.{m}" for m in ("prepare", "main", "evaluate", "predict")]
    cwd, data_dir = tmp_path / "work", tmp_path / "tfds"
    write_my_cxr(cwd)
    (cwd / "configs").symlink_to(pathlib.Path(ROOT, "configs"))  # README runs from the root
    prepare, main, evaluate, predict = commands

    out = _run(prepare, f"--data_dir={data_dir}", cwd=cwd)
    [folder] = (data_dir / "csv" / "my_cxr").iterdir()
    summary = json.loads((folder / "prepare_summary.json").read_text())
    assert summary["splits"] == SPLITS, out
    assert summary["skipped"] == dict.fromkeys(BAD.values(), 1)
    assert summary["examples"] == {reason: [row] for row, reason in BAD.items()}
    for row, reason in BAD.items():
        assert re.search(rf"    {reason} +1   e\.g\. {row}\n", out), (row, out)
    assert json.loads((folder / "metadata.json").read_text())["label_names"] == list(LABEL_OF)

    short = ["--config.train.total_steps=4", "--config.train.eval_every=4"]
    data = [f"--config.data.data_dir={data_dir}", "--config.data.batch_size=8"]
    _run(main, *data, *short, cwd=cwd)
    workdir = cwd / "runs" / "my_cxr"
    assert checkpointing.Checkpointer(str(workdir), keep=10).latest_step() == 4

    (workdir / "eval" / "4.json").unlink(missing_ok=True)  # what evaluate writes, not main
    _run(evaluate, *data, cwd=cwd)
    results = json.loads((workdir / "eval" / "4.json").read_text())
    assert results["step"] == 4
    assert results["zero_shot"]["examples"] == SPLITS["test"]
    assert 0.0 <= results["zero_shot"]["macro_auroc"] <= 1.0
    assert results["retrieval"]["examples"] == SPLITS["test"]
    assert 0.0 <= results["retrieval"]["i2t/R@1"] <= 1.0

    out = _run(predict, cwd=cwd)
    [labels] = [arg.split("=", 1)[1].split(",") for arg in predict if arg.startswith("--labels=")]
    printed = dict(line.rsplit(None, 1) for line in out.strip().splitlines()[-len(labels) :])
    assert sorted(printed) == sorted(labels), out
    assert all(0.0 <= float(p) <= 1.0 for p in printed.values()), out
