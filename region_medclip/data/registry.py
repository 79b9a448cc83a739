"""The dataset registry: the one place that knows what each dataset is.

An entry holds a dataset's TFDS builder, the names behind its ``labels [C]`` vectors, its
"no finding" class, the zero-shot prompt sets written in its own report language, and the
concept vocabulary of the distillation teacher. The pipeline, the evaluators and the teacher
read entries from here; nothing else branches on a dataset's name.

``get("synth_cxr").class_names()`` → ``["no finding", "nodule", ...]``.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from region_medclip.data.prompts import template_prompts

# A prompt set: class names ``[C]`` → ``(positive [C][P], negative [C][Q] or None)``. ``None``
# negatives: each finding is weighed against the generic negations of its name.
PromptFn = Callable[[list[str]], tuple[list[list[str]], list[list[str]] | None]]


def _templates(names: list[str]) -> tuple[list[list[str]], None]:
    return template_prompts(names), None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset's entry.

    Attributes:
      name: the name configs use (``data.train`` / ``data.eval``).
      builder: ``() → builder class`` (imported when first asked for: TFDS is slow to import).
      label_names: the names behind ``labels [C]``, in order; ``None`` when the user sets them
        (the ``csv`` reader's ``num_labels``), ``()`` for a dataset without labels.
      no_finding: the name of the "no finding" class (boxes with it are clear regions).
      prompt_sets: extra zero-shot prompt sets by name; ``templates`` is every dataset's.
      concepts: ``() → [K]`` distillation concept phrases; default: the label names.
      source: ``(split, data_config) → random-access source``; default: a prepared builder.
      config: the builder config this entry reads ("" for the builder's default).
    """

    name: str
    builder: Callable[[], type]
    label_names: tuple[str, ...] | None = ()
    no_finding: str = "no finding"
    prompt_sets: Mapping[str, PromptFn] = dataclasses.field(default_factory=dict)
    concepts: Callable[[], list[str]] | None = None
    source: Callable[[str, Any], Any] | None = None
    config: str = ""

    def class_names(self) -> list[str]:
        """``[C]`` lower-case label names, in the order of the ``labels`` vectors.

        Raises:
          ValueError: the dataset has no label names.
        """
        if not self.label_names:
            raise ValueError(f"dataset {self.name!r}: no label names for zero-shot evaluation")
        return [n.lower() for n in self.label_names]

    def no_finding_index(self) -> int:
        """Index of the "no finding" class in :meth:`class_names`, or -1."""
        names = [n.lower() for n in self.label_names or ()]
        return names.index(self.no_finding) if self.no_finding in names else -1

    def prompts(
        self, kind: str, names: list[str]
    ) -> tuple[list[list[str]], list[list[str]] | None]:
        """The prompt set ``kind`` for class ``names``: ``(positive [C][P], negative or None)``.

        Raises:
          ValueError: naming the prompt sets this dataset has.
        """
        sets = {"templates": _templates, **self.prompt_sets}
        if kind not in sets:
            raise ValueError(
                f"config.evals.*.prompts: {kind!r} is not a prompt set of dataset {self.name!r}; "
                f"it has {sorted(sets)}"
            )
        return sets[kind](names)

    def concept_vocabulary(self) -> list[str]:
        """``[K]`` phrases the distillation teacher scores regions against.

        Raises:
          ValueError: the dataset has neither concepts nor label names.
        """
        if self.concepts is not None:
            return self.concepts()
        if not self.label_names:
            raise ValueError(f"dataset {self.name!r}: no concept vocabulary for distillation")
        return [n.lower() for n in self.label_names]

    def data_source(self, split: str, data_config) -> Any:
        """Random-access source of schema records of ``split``."""
        if self.source is not None:
            return self.source(split, data_config)
        data_dir = os.path.expanduser(data_config.data_dir)
        # Our own class, not tfds.data_source(name): TFDS ships a different `chexpert` builder.
        kwargs = dict(config=self.config) if self.config else {}
        builder = self.builder()(data_dir=data_dir, file_format="array_record", **kwargs)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"config.data: dataset {self.name!r} is not prepared in {data_dir}; prepare "
                f"it first: python -m region_medclip.prepare --dataset={self.name} "
                f"--manual_dir=DIR --data_dir={data_config.data_dir}"
            )
        return builder.as_data_source(split=split)


def _real_builder(name: str) -> Callable[[], type]:
    def load() -> type:
        from region_medclip.data.builders import real

        return real.BUILDERS[name]

    return load


def _real_entries() -> dict[str, Dataset]:
    from region_medclip.data import formats, prompts_chexpert

    # Datasets labelled with CheXpert's observations take GLoRIA's / MedCLIP's prompts.
    chexpert_sets = {
        "combinatorial": prompts_chexpert.chexpert_prompts,
        "combinatorial_all": prompts_chexpert.chexpert_all_prompts,
    }
    entries = {
        name: Dataset(
            name,
            _real_builder(name),
            label_names=labels,
            prompt_sets=chexpert_sets if labels == formats.CHEXPERT_LABELS else {},
        )
        for name, labels in formats.LABEL_NAMES.items()
    }
    entries["csv"] = dataclasses.replace(entries["csv"], source=_unnamed_csv)
    # The CheXpert 5x200 evaluation subset (GLoRIA, MedCLIP): the builder's "5x200" config,
    # a test split of 200 frontal train images for each competition finding.
    entries["chexpert_5x200"] = dataclasses.replace(
        entries["chexpert"], name="chexpert_5x200", config="5x200"
    )
    return entries


def _unnamed_csv(split: str, data_config) -> Any:
    """``csv`` is the builder of the user's datasets, not one: each is prepared under a name."""
    raise FileNotFoundError(
        "config.data: 'csv' is not a dataset: prepare your CSV/JSONL under a name, python -m "
        "region_medclip.prepare --dataset=csv --name=NAME --manual_dir=FILE "
        f"--data_dir={data_config.data_dir}, then set data.train=NAME / data.eval=NAME"
    )


def _synth_builder() -> type:
    from region_medclip.data.synth import builder as synth_cxr

    return synth_cxr.SynthCxr


def _synth_source(split: str, data_config) -> Any:
    """``synth_cxr`` is built on first use, at ``data.image_size``."""
    from region_medclip.data.synth import builder as synth_cxr

    synth = data_config.get("synth", {})
    builder = synth_cxr.ensure_built(
        os.path.expanduser(data_config.data_dir),
        size=data_config.image_size,
        num=synth.get("num", synth_cxr.DEFAULT_NUM),
        seed=synth.get("seed", 0),
    )
    return builder.as_data_source(split=split)


def _synth_entry() -> Dataset:
    from region_medclip.data.synth import prompts as synth_prompts
    from region_medclip.data.synth import text as synth_text

    return Dataset(
        "synth_cxr",
        _synth_builder,
        label_names=synth_text.LABELS,
        prompt_sets={
            "combinatorial": synth_prompts.combinatorial_prompts,
            "sentences": synth_prompts.sentence_prompts,
            "report": synth_prompts.report_prompts,
        },
        concepts=synth_text.concept_vocabulary,
        source=_synth_source,
    )


_REGISTRY: dict[str, Dataset] = {}


def datasets() -> dict[str, Dataset]:
    """Every registered dataset by name (the user's prepared CSV datasets are found by
    :func:`get` in a data directory)."""
    if not _REGISTRY:
        _REGISTRY.update({"synth_cxr": _synth_entry(), **_real_entries()})
    return _REGISTRY


def user_datasets(data_dir: str) -> dict[str, str]:
    """The user's datasets prepared in ``data_dir`` (``data_dir/csv/<name>/<version>``):
    ``{name: version folder}``, the newest version of each."""
    root = epath.Path(os.path.expanduser(data_dir)) / "csv"
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(root.iterdir()):
        versions = sorted(v for v in folder.iterdir() if (v / "dataset_info.json").exists())
        if folder.name != "default" and versions:
            found[folder.name] = str(versions[-1])
    return found


def _user_entry(name: str, folder: str) -> Dataset:
    """The entry of a prepared user dataset: its label names from the build's metadata."""
    metadata = epath.Path(folder) / "metadata.json"
    labels = json.loads(metadata.read_text()).get("label_names") if metadata.exists() else None

    def source(split: str, data_config) -> Any:
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(folder)
        if split not in builder.info.splits:
            raise ValueError(
                f"dataset {name!r} ({folder}) has no {split!r} split; it has "
                f"{sorted(builder.info.splits)}"
            )
        return builder.as_data_source(split=split)

    return Dataset(name, _real_builder("csv"), label_names=tuple(labels or ()), source=source)


def get(name: str, data_dir: str | None = None) -> Dataset:
    """The entry of dataset ``name``: a registered one, or a user's dataset prepared in
    ``data_dir`` (``python -m region_medclip.prepare --dataset=csv --name=NAME``).

    Raises:
      KeyError: naming the known datasets and the prepare command.
    """
    registry = datasets()
    if name in registry:
        return registry[name]
    prepared = user_datasets(data_dir) if data_dir else {}
    if name in prepared:
        return _user_entry(name, prepared[name])
    where = f" or prepared in {data_dir}" if data_dir else ""
    raise KeyError(
        f"unknown dataset {name!r}; known{where}: {sorted(registry) + sorted(prepared)}. Your "
        f"own CSV/JSONL: python -m region_medclip.prepare --dataset=csv --name={name} "
        f"--manual_dir=FILE"
    )
