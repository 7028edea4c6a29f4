"""``medvl compare``: runs side by side, one row per evaluated model, with what each cost to train and score.

A row joins an eval stage with the train (or tune) stage whose model it scored (matched by the model folder
both summaries name); an eval stage with no such train stage scored the untrained base (a zero-shot row), and a
train stage nobody evaluated still gets a row. Columns: recipe, finetune policy, trainable parameters, training
wall time, samples/s, optimizer steps, best val loss, eval wall time, then the chosen eval metrics (default: the
task's headline metrics present). Rows come from run folders (``output_dir``s, or single stage folders) or from
an MLflow experiment (the train and eval stage runs a ``medvl`` command logged, joined the same way by the
``medvl.model_dir`` tag). The chart (PNG) has one bar panel per metric and one for the wall times.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

from medvl.runs import EVAL_SUMMARY_FILE, METRICS_FILE, SUMMARY_FILE
from medvl.storage import Location

HEADLINE_METRICS = ("bleu_4", "meteor", "rouge_l", "cider", "bertscore_f1", "ce_micro_f1_14", "vqa_acc",
                    "vqa_acc_closed", "vqa_acc_open")
MODEL_DIR_TAG = "medvl.model_dir"


@dataclass
class Row:
    run: str
    trained_by: str  # the train stage, "" for the untrained base
    evaluated_by: str  # the eval stage, "" when nobody evaluated the model
    recipe: str = ""
    finetune: str = ""
    trainable_params: int | None = None
    train_time_s: float | None = None
    samples_per_s: float | None = None
    steps: int | None = None
    best_val_loss: float | None = None
    eval_time_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    order: float = 0.0  # when the row's last stage finished (rows are listed in run order)

    @property
    def label(self) -> str:
        return self.trained_by or f"{self.evaluated_by} (untrained)"


def _stage(train: dict | None, evaluation: dict | None, metrics: dict | None, run: str, order: float) -> Row:
    train, evaluation = train or {}, evaluation or {}
    return Row(
        run=run, trained_by=train.get("stage", ""), evaluated_by=evaluation.get("stage", ""),
        recipe=train.get("recipe") or evaluation.get("recipe", ""),
        finetune=train.get("finetune", "") if train else "none (zero-shot)",
        trainable_params=_count(train.get("trainable_params")), train_time_s=train.get("wall_time_s"),
        samples_per_s=train.get("samples_per_s"), steps=_count(train.get("steps")),
        best_val_loss=train.get("best_val_loss"),
        eval_time_s=evaluation.get("wall_time_s"),
        metrics={k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        order=order,
    )


def _count(value: Any) -> int | None:
    """A count, also when it went through MLflow (which stores every metric as a float)."""
    return None if value is None else int(value)


def _folder_key(folder: str) -> str:
    """A model folder named the same however it was spelled (a trailing or doubled slash)."""
    scheme, sep, rest = folder.rpartition("://")
    return scheme + sep + posixpath.normpath(rest) if rest else ""


def join(trains: list[dict], evals: list[tuple[dict, dict]], run: str) -> list[Row]:
    """Rows from train summaries and (eval summary, metrics) pairs, each carrying ``_order``."""
    by_model = {_folder_key(t["model_dir"]): t for t in trains if t.get("model_dir")}
    used: set[str] = set()
    rows = []
    for evaluation, metrics in evals:
        train = by_model.get(_folder_key(evaluation.get("model_dir", "")))
        if train is not None:
            used.add(train["stage"])
        rows.append(_stage(train, evaluation, metrics, run, evaluation.get("_order", 0.0)))
    rows += [_stage(t, None, None, run, t.get("_order", 0.0)) for t in trains if t["stage"] not in used]
    return sorted(rows, key=lambda row: row.order)


def rows_from_folder(folder: Location) -> list[Row]:
    """Rows of one ``output_dir`` (every stage folder in it) or of one stage folder, local or on object storage."""
    stage_dirs = [folder] if _is_stage(folder) else [p for p in folder.iterdir() if _is_stage(p)]  # by name
    trains, evals = [], []
    for stage_dir in stage_dirs:
        if (stage_dir / SUMMARY_FILE).is_file():
            summary = json.loads((stage_dir / SUMMARY_FILE).read_text())
            summary.setdefault("stage", stage_dir.name)
            trains.append(summary | {"_order": (stage_dir / SUMMARY_FILE).modified()})
        if (stage_dir / METRICS_FILE).is_file():
            metrics = json.loads((stage_dir / METRICS_FILE).read_text())
            cost_file = stage_dir / EVAL_SUMMARY_FILE
            cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {"stage": stage_dir.name}
            evals.append((cost | {"_order": (stage_dir / METRICS_FILE).modified()}, metrics))
    run = folder.name if stage_dirs != [folder] else folder.parent.name
    return join(trains, evals, run)


def _is_stage(path: Location) -> bool:
    return path.is_dir() and ((path / SUMMARY_FILE).is_file() or (path / METRICS_FILE).is_file())


def rows_from_mlflow(uri: str, experiment: str) -> list[Row]:
    """Rows from the train and eval stage runs of an MLflow experiment (every command that logged to it)."""
    from mlflow import MlflowClient

    from medvl.tracking.mlflow_store import KIND_TAG

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"--experiment: no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)
    trains, evals = [], []
    for run in (r for r in runs if r.data.tags.get(KIND_TAG) in ("train", "eval")):
        data, stage = run.data, run.info.run_name
        order = (run.info.end_time or run.info.start_time) / 1000
        model_dir = data.tags.get(MODEL_DIR_TAG, "")
        if data.tags[KIND_TAG] == "train":
            trains.append({**data.metrics, "stage": stage, "model_dir": model_dir, "_order": order,
                           "recipe": data.params.get("model.recipe", ""),
                           "finetune": data.params.get("train.finetune", "")})
        else:
            cost = {"stage": stage, "model_dir": model_dir, "_order": order, "recipe": data.params.get("model.recipe"),
                    "wall_time_s": data.metrics.get("wall_time_s")}
            metrics = {k: v for k, v in data.metrics.items() if k not in ("wall_time_s", "samples_per_s")}
            evals.append((cost, metrics))
    return join(trains, evals, experiment)


def default_metrics(rows: list[Row]) -> list[str]:
    present = {key for row in rows for key in row.metrics}
    return [key for key in HEADLINE_METRICS if key in present]


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"


def markdown(rows: list[Row], metrics: list[str]) -> str:
    """The table; its ``run`` column only when the rows come from more than one run."""
    several_runs = len({row.run for row in rows}) > 1
    header = [*(["run"] if several_runs else []), "trained by", "evaluated by", "recipe", "finetune",
              "trainable params", "train wall time", "samples/s", "steps", "best val loss", "eval wall time", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [*([row.run] if several_runs else []), row.trained_by or "— (untrained base)",
                 row.evaluated_by or "—", row.recipe, row.finetune or "—", _number(row.trainable_params),
                 _seconds(row.train_time_s), _number(row.samples_per_s, 1), _number(row.steps),
                 _number(row.best_val_loss), _seconds(row.eval_time_s), *(_number(row.metrics.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], metrics: list[str]) -> bytes:
    """One bar panel per metric and one of the wall times (training and evaluation stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(metrics) + 1
    columns = min(3, panels)
    figure, axes = plt.subplots((panels + columns - 1) // columns, columns, figsize=(4.5 * columns,
                                3.6 * ((panels + columns - 1) // columns)), dpi=100, squeeze=False)
    labels = [row.label for row in rows]
    positions = range(len(rows))
    flat = list(axes.flat)
    for ax, metric in zip(flat, metrics):
        ax.bar(positions, [row.metrics.get(metric, 0.0) for row in rows], color="tab:blue")
        ax.set_title(metric)
    ax = flat[len(metrics)]
    train = [row.train_time_s or 0.0 for row in rows]
    ax.bar(positions, train, color="tab:orange", label="train")
    ax.bar(positions, [row.eval_time_s or 0.0 for row in rows], bottom=train, color="tab:green", label="eval")
    ax.set_title("wall time (s)")
    ax.legend(fontsize=7)
    for ax in flat[:panels]:
        ax.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in flat[panels:]:
        ax.set_visible(False)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    return png.getvalue()


def write_comparison(run_dirs: list[str | Location], metrics: list[str], out: Location | None,
                     rows: list[Row] | None = None, endpoint_url: str = "") -> list[Row]:
    """Collect the rows (unless given), write the table to ``out`` and the chart beside it (``out`` as .png)."""
    if rows is None:
        rows = [row for folder in run_dirs for row in rows_from_folder(_location(folder, endpoint_url))]
    metrics = metrics or default_metrics(rows)
    table = markdown(rows, metrics)
    if out is None:
        print(table, end="")
        return rows
    out.write_text(table)
    (out.parent / f"{posixpath.splitext(out.name)[0]}.png").write_bytes(plot(rows, metrics))
    return rows


def _location(folder: str | Location, endpoint_url: str) -> Location:
    return folder if isinstance(folder, Location) else Location.of(folder, endpoint_url)
