"""Runs a benchmark suite on trained models and lays the results out as the published tables.

``run_suite(["runs/tiny"], "cxr")`` → ``{"suite", "protocols": [{name, title, dataset, status,
rows: [{model, step, metrics}], published: [...]}]}``; :func:`markdown` writes it as one
Markdown table a protocol: our models' rows first, then the published numbers of that protocol
in rows of their own, each marked "as reported" with its source and table — never averaged,
ranked or mixed with ours (``published.py``).
"""

import dataclasses
import logging
import math

from region_medclip import api
from region_medclip.benchmark import published, suites
from region_medclip.data import registry as data_registry
from region_medclip.evaluators import run as run_lib

_log = logging.getLogger("region_medclip.benchmark")


def prepared(protocol: suites.Protocol, data_config) -> str:
    """ "" when ``protocol``'s dataset can be read, else why not (the prepare command)."""
    split = next(iter(protocol.evals.values())).get("split", "test")
    try:
        entry = data_registry.get(protocol.dataset, data_config.data_dir)
        entry.data_source(split, data_config)
    except (FileNotFoundError, KeyError, ValueError) as err:
        _log.info("%s: %s", protocol.name, err)
        return (
            f"not prepared: python -m region_medclip.prepare --dataset={protocol.dataset} "
            f"--manual_dir=DIR --data_dir={data_config.data_dir}"
        )
    return ""


def evaluate_protocols(model: api.Model, protocols: list, data_dir: str) -> dict[str, dict]:
    """``{protocol name: {column title: value}}`` of ``model`` on ``protocols``, all in one
    ``run.evaluate`` call so that each dataset's split is embedded once for all of them."""
    if not protocols:
        return {}
    config = model.config.copy_and_resolve_references()
    with config.unlocked():
        config.data.data_dir = data_dir
        config.evals = {
            f"{protocol.name}/{name}": dict(entry, dataset=protocol.dataset, every=0)
            for protocol in protocols
            for name, entry in protocol.evals.items()
        }
    results = run_lib.evaluate(config, model.module, model.params)
    scores = {}
    for protocol in protocols:
        values = {}
        for title, name, metric, _ in protocol.columns:
            out = results[f"{protocol.name}/{name}"]
            values[title] = out.get(metric, float("nan"))
            if f"{metric}/std" in out:  # the probes' spread over seeds
                values[f"{title}/std"] = out[f"{metric}/std"]
        scores[protocol.name] = values
    return scores


def run_suite(workdirs: list[str], suite: str, data_dir: str | None = None) -> dict:
    """Every protocol of ``suite`` (``suites.SUITES``) on each workdir's latest checkpoint.

    Args:
      workdirs: training workdirs (or ``convert`` outputs), one row each.
      suite: ``cxr`` | ``synth``.
      data_dir: where the datasets are prepared (default: the first run's data.data_dir).

    Raises:
      ValueError: naming the known suites.
    """
    if suite not in suites.SUITES:
        raise ValueError(f"--suite: {suite!r} is not one of {sorted(suites.SUITES)}")
    models = [(workdir, api.load(workdir)) for workdir in workdirs]
    data_config = models[0][1].config.data.copy_and_resolve_references()
    if data_dir:
        with data_config.unlocked():
            data_config.data_dir = data_dir
    status = {p.name: prepared(p, data_config) for p in suites.SUITES[suite]()}
    ready = [p for p in suites.SUITES[suite]() if not status[p.name]]
    scores = {}
    for workdir, model in models:
        _log.info("evaluating %s on %s", workdir, [p.name for p in ready])
        scores[workdir] = evaluate_protocols(model, ready, data_config.data_dir)
    protocols = []
    for protocol in suites.SUITES[suite]():
        rows = [
            dict(model=workdir, metrics=scores[workdir][protocol.name])
            for workdir, _ in models
            if protocol.name in scores[workdir]
        ]
        reference = published.rows(protocol.name) if protocol.name in published.PROTOCOLS else []
        protocols.append(
            dict(
                name=protocol.name,
                title=protocol.title,
                dataset=protocol.dataset,
                status=status[protocol.name] or "evaluated",
                columns=[c[0] for c in protocol.columns],
                rows=rows,
                published=[_published_row(protocol, r) for r in _by_method(reference)],
            )
        )
    return dict(suite=suite, data_dir=data_config.data_dir, protocols=protocols)


def _by_method(rows: list) -> list[list]:
    """Published rows grouped by (method, source, table), in their order."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.method, row.source, row.table), []).append(row)
    return list(groups.values())


def _published_row(protocol: suites.Protocol, rows: list) -> dict:
    """One method's published numbers in ``protocol``'s columns (blank where not reported)."""
    by_metric = {row.metric: row.value for row in rows}
    first = rows[0]
    return dict(
        method=first.method,
        metrics={title: by_metric.get(key) for title, _, _, key in protocol.columns if key},
        source=f"{first.source}, {first.table}",
        url=first.url,
        note=first.note,
        numbers=[dataclasses.asdict(row) for row in rows],
    )


def _cell(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def markdown(result: dict) -> str:
    """The suite's tables in Markdown (see the module docstring)."""
    lines = [f"# Benchmark suite `{result['suite']}`", ""]
    for protocol in result["protocols"]:
        columns = protocol["columns"]
        lines += [
            f"## {protocol['title']}",
            "",
            f"Dataset `{protocol['dataset']}`: {protocol['status']}.",
            "",
            "| model | " + " | ".join(columns) + " | source |",
            "|---|" + "---|" * (len(columns) + 1),
        ]
        for row in protocol["rows"]:
            metrics = row["metrics"]
            cells = " | ".join(_cell(metrics.get(c), metrics.get(f"{c}/std")) for c in columns)
            lines.append(f"| {row['model']} | {cells} | this run |")
        if not protocol["rows"]:
            lines.append(f"| region-medclip | {' | '.join('—' for _ in columns)} | not run |")
        for row in protocol["published"]:
            cells = " | ".join(_cell(row["metrics"].get(c)) for c in columns)
            lines.append(f"| *as reported:* {row['method']} | {cells} | {row['source']} |")
        lines.append("")
    if any(p["published"] for p in result["protocols"]):
        lines.append(
            "Published rows are quoted as their sources report them, on their own splits, "
            "prompts and preprocessing; they are not comparable number for number with ours."
        )
    return "\n".join(lines) + "\n"
