"""What a search leaves in its folder (paths: :class:`medvl.runs.TuneLayout`): the table, the curves, the best trial.

- the trial table, as CSV and Markdown: one row per trial, best first: trial id, status, one column per searched key,
  ``steps`` (the last reported optimizer step), ``planned_steps``, the metric (its best value over the trial's
  validations), ``last_<metric>``, ``stopped_early`` and ``stopped_by`` (``asha``, or ``patience`` for the
  training loop's own early stopping).
- the curves (PNG): the metric against steps for every trial (stopped trials dashed, the best bold).
- the best model: the best trial's best checkpoint as a model folder (for LoRA recipes a peft adapter folder),
  which ``medvl eval --model`` and peft's ``PeftModel.from_pretrained`` take.
- the best spec: the base spec with the best values, the tune stage replaced by a train stage: ready to run.
- a summary like a train stage's, so an eval stage after the tune stage scores the best model.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from medvl.runs import TRIAL_STAGE, TuneLayout, write_summary as write_stage_summary
from medvl.spec import JobSpec, StageSpec, set_dotted
from medvl.storage import Location
from medvl.tune.space import Dimension
from medvl.tune.trial import plain


@dataclass
class TrialRow:
    trial_id: str
    status: str
    config: dict[str, Any]
    steps: int
    planned_steps: int
    best: float  # the metric's best value over the trial's validations (nan: none reported)
    last: float
    stopped_by: str  # "asha" | "patience" | ""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) at every validation
    best_checkpoint: str = ""  # path of the checkpoint reported with the best metric

    @property
    def stopped_early(self) -> bool:
        return bool(self.stopped_by)


def trial_rows(results, statuses: dict[str, str], space: list[Dimension], metric: str, mode: str,
               planned: dict[str, int]) -> list[TrialRow]:
    """One row per trial of a ResultGrid, best first.

    ``statuses``: each trial's saved status by trial id; ``planned``: each trial's planned steps by trial id.
    """
    rows = []
    for result in results:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
        frame = result.metrics_dataframe
        reports = [] if frame is None or metric not in frame else frame.dropna(subset=[metric]).to_dict("records")
        curve = [(int(r["step"]), float(r[metric])) for r in reports if "step" in r]
        pick = min if mode == "min" else max
        best_report = pick(reports, key=lambda r: r[metric]) if reports else {}
        last = reports[-1] if reports else {}
        steps = int(last.get("step", 0))
        planned_steps = planned.get(trial_id, 0)
        stopped_by = ""
        if last.get("stopped_early"):
            stopped_by = "patience"
        elif statuses.get(trial_id) == "TERMINATED" and reports and steps < planned_steps:
            stopped_by = "asha"
        rows.append(TrialRow(
            trial_id=trial_id,
            status=statuses.get(trial_id, "UNKNOWN"),
            config={d.field: plain(result.config.get(d.field)) for d in space},
            steps=steps,
            planned_steps=planned_steps,
            best=float(best_report.get(metric, math.nan)),
            last=float(last.get(metric, math.nan)),
            stopped_by=stopped_by,
            curve=curve,
            best_checkpoint=checkpoint_of(result, best_report),
        ))
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (math.isnan(r.best), sign * r.best if not math.isnan(r.best) else 0))


def checkpoint_of(result, report: dict) -> str:
    """The path of the checkpoint a trial reported with ``report``: Ray Train's run folder when a ``TorchTrainer``
    trained it (``TuneReportCallback`` names it), else the trial's own folder, where Tune keeps it; "" if none."""
    if report.get("checkpoint_path"):
        return str(report["checkpoint_path"])
    name = report.get("checkpoint_dir_name")
    return f"{result.path.rstrip('/')}/{name}" if isinstance(name, str) and name else ""


def write_tables(rows: list[TrialRow], space: list[Dimension], metric: str, tune_dir: Location) -> None:
    header = ["trial_id", "status", *(d.field for d in space), "steps", "planned_steps", metric, f"last_{metric}",
              "stopped_early", "stopped_by"]
    table = [[r.trial_id, r.status, *(r.config[d.field] for d in space), r.steps, r.planned_steps,
              _number(r.best), _number(r.last), r.stopped_early, r.stopped_by] for r in rows]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(table)
    TuneLayout(tune_dir).trials_csv.write_text(text.getvalue())
    stopped = sum(r.stopped_early for r in rows)
    lines = [f"# Search: {len(rows)} trials, {stopped} stopped early, best first", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in table]
    TuneLayout(tune_dir).trials_md.write_text("\n".join(lines) + "\n")


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def plot_curves(rows: list[TrialRow], metric: str, path: Location) -> None:
    """The metric against optimizer steps, one line per trial (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    best_id = rows[0].trial_id if rows and rows[0].curve else None
    for row in rows:
        if not row.curve:
            continue
        steps, values = zip(*row.curve)
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row.config.items())
        axes.plot(steps, values, marker="o", markersize=3,
                  linestyle="--" if row.stopped_early else "-",
                  linewidth=2.5 if row.trial_id == best_id else 1.0,
                  label=label if len(rows) <= 12 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} of every trial (dashed: stopped early; bold: best)")
    if len(rows) <= 12:
        axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    path.write_bytes(png.getvalue())


def export_best(row: TrialRow, model_dir: Location, recipe, filesystem=None) -> Location:
    """Export the best trial's best checkpoint (HF/peft files, not the resume state; ZeRO shards consolidated with
    ``recipe``) to ``model_dir``."""
    import ray.train

    from medvl.train.trainer import export_checkpoint

    if not row.best_checkpoint:
        raise RuntimeError(f"trial {row.trial_id} reported no checkpoint with its metric")
    export_checkpoint(ray.train.Checkpoint(row.best_checkpoint, filesystem=filesystem), model_dir, recipe)
    return model_dir


def export_trials(rows: list[TrialRow], layout: TuneLayout, recipe, metric: str, filesystem=None) -> list[dict]:
    """Every trial's best checkpoint as a model folder beside its trial (an adapter is megabytes), listed best
    first with its searched values and metric in ``trial_models.json``: what ``serve.adapters: top:K`` serves."""
    exported = []
    for row in rows:
        if not row.best_checkpoint or math.isnan(row.best):
            continue
        model_dir = export_best(row, layout.trial_model(row.trial_id), recipe, filesystem)
        exported.append({"trial_id": row.trial_id, "config": row.config, "metric": metric, "value": row.best,
                         "steps": row.steps, "model_dir": str(model_dir)})
    layout.trial_models.write_text(json.dumps(exported, indent=1))
    return exported


def best_job_spec(spec: JobSpec, tune_stage: StageSpec, row: TrialRow) -> dict:
    """The spec to rerun the best trial: the search's base spec with its values, tune stage → train stage."""
    raw = asdict(spec)
    for key, value in row.config.items():
        set_dotted(raw, key, value, where="best")
    names = {s["name"] for s in raw["stages"]}
    train_name = TRIAL_STAGE if TRIAL_STAGE not in names else f"{tune_stage.name}_best"
    stages = []
    for stage in raw["stages"]:
        if stage["name"] == tune_stage.name:
            stage = {"kind": "train", "name": train_name}
        elif stage["kind"] == "tune":
            continue
        stage = {k: v for k, v in stage.items() if v or k == "kind"}
        stages.append(stage["kind"] if set(stage) == {"kind", "name"} and stage["name"] == stage["kind"] else stage)
    raw["stages"] = stages
    if spec.tune.max_steps:  # the trial trained at most tune.max_steps
        raw["train"]["max_steps"] = min(raw["train"]["max_steps"] or spec.tune.max_steps, spec.tune.max_steps)
    return raw


def write_best_spec(raw: dict, row: TrialRow, metric: str, path: Location) -> None:
    values = ", ".join(f"{k}={v}" for k, v in row.config.items())
    header = (f"# The best trial of the search ({row.trial_id}: {metric} {row.best:.6g} at {row.steps} steps): "
              f"{values}.\n# Run it with: medvl run {path}\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))


def write_summary(tune_dir: Location, stage: StageSpec, row: TrialRow, model_dir: Location, model_source: str,
                  metric: str) -> None:
    summary = {
        "stage": stage.name,
        "model_source": model_source,
        "model_dir": str(model_dir),
        "best_trial": row.trial_id,
        "config": row.config,
        "steps": row.steps,
        f"best_{metric}": row.best,
        "history": [{"step": s, metric: v} for s, v in row.curve],
    }
    write_stage_summary(tune_dir, summary)
