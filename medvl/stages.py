"""Run a job spec's stages in order, handing each train stage's model to the stages after it.

A command's output is routed (:mod:`medvl.tracking.console`: medvl's own lines on the terminal, the rest in
``<output_dir>/medvl.log``) and tracked (:mod:`medvl.tracking.mlflow_store`: a parent run for the command, a child
run per stage). What a finished stage left (its summary, metrics, tables) is logged to its run here, so the
stages themselves only write their files.
"""
from __future__ import annotations

from medvl.runs import RunLayout, TuneLayout, driver_files, read_summary, stage_model
from medvl.spec import JobSpec, StageSpec

# A train stage's summary fields logged as its run's final metrics (and the first three on the parent run).
TRAIN_COSTS = ("wall_time_s", "samples_per_s", "best_val_loss", "tokens_per_s", "train_time_s", "steps",
               "samples_trained", "trainable_params", "total_params", "peak_memory_mb", "peak_gpu_memory_mb")


def run_stages(spec: JobSpec, kinds: tuple[str, ...] | None = None, model_dir: str | None = None) -> None:
    """Run every stage (or only those of ``kinds``); ``model_dir`` overrides the model an eval stage scores."""
    from medvl.resources import ResourceCheck
    from medvl.runtime import ray_session
    from medvl.tracking.console import routed_output
    from medvl.tracking.mlflow_store import Tracker

    layout = RunLayout.for_spec(spec)
    selected = [stage for stage in spec.stages if kinds is None or stage.kind in kinds]
    with driver_files(layout), routed_output(layout.log_file):
        print(f"[medvl] {spec.name}: Ray's and the other libraries' output goes to {layout.log_file}", flush=True)
        tracked = any(stage.kind != "serve" for stage in selected)  # serving: no run
        tracker, status = None, "FAILED"
        try:
            with ray_session(spec) as stop_signals:
                resources = ResourceCheck(spec)
                resources.before_all(selected)  # without an autoscaler a stage asking too much fails before any runs
                check_java(spec, selected)
                tracker = Tracker(spec, enabled=tracked and spec.tracking.enabled)  # no run for a Ray never reached
                if tracked:
                    print(f"[medvl] {tracker.where}", flush=True)
                last_train: str | None = None
                for stage in spec.stages:
                    if stage in selected:
                        stop_signals.rearm()  # Ray Train leaves its own SIGINT handler behind after a fit
                        resources.before(stage)
                        if _run_tracked(spec, stage, last_train, model_dir, tracker) is False:
                            status = "KILLED"
                            return  # an interrupted search: the stages after it wait for the resumed run
                    if stage.kind in ("train", "tune"):  # a tune stage's best trial is a trained model too
                        last_train = stage.name
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):  # Ctrl+C, or SIGINT / SIGTERM (runtime.Stopped)
            status = "KILLED"
            raise
        except BaseException:
            print(f"[medvl] {spec.name} failed; every process's output is in {layout.log_file}", flush=True)
            raise
        finally:
            if tracker is not None:
                tracker.finish(status)


def _run_tracked(spec: JobSpec, stage: StageSpec, last_train: str | None, model_dir: str | None, tracker):
    """Run a stage inside its own run; returns what the stage returned (False: an interrupted search)."""
    stage_spec = spec.for_stage(stage)
    log = tracker.stage(stage, stage_spec) if stage.kind != "serve" else None
    status = "FAILED"
    try:
        outcome = _run_stage(spec, stage, last_train, model_dir, log)
        if log is not None:
            try:
                _record(stage_spec, stage, outcome, log, tracker)
            except Exception as exc:  # noqa: BLE001 - the stage's own outputs are written; tracking must not fail it
                print(f"[medvl tracking] {stage.name}: could not log its outputs: {exc!r}", flush=True)
        status = "KILLED" if outcome is False else "FINISHED"
        return outcome
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if log is not None:
            log.finish(status)


def check_java(spec: JobSpec, stages: list[StageSpec]) -> None:
    """An eval stage that needs Java and lacks it fails before the job's first stage, not after training."""
    from medvl.eval.evaluate import java_reason
    from medvl.models.registry import build_recipe

    for stage in stages:
        if stage.kind == "eval":
            stage_spec = spec.for_stage(stage)
            java_reason(stage_spec, build_recipe(stage_spec))


def _run_stage(spec: JobSpec, stage: StageSpec, last_train: str | None, model_dir: str | None, log):
    """Run one stage; returns what it returned (False: an interrupted search)."""
    stage_spec = spec.for_stage(stage)
    endpoint = spec.data.endpoint_url
    start_from = stage_model(spec.output_dir, stage.start_from, endpoint) if stage.start_from else None
    print(f"[medvl] stage {stage.name} ({stage.kind})", flush=True)
    if stage.kind == "prepare":
        from medvl.data.prepare import run_prepare_stage

        return run_prepare_stage(stage_spec)
    if stage.kind == "train":
        from medvl.train.trainer import run_train_stage

        return run_train_stage(stage_spec, stage, start_from=start_from, log=log)
    if stage.kind == "eval":
        from medvl.eval.evaluate import run_eval_stage

        untrained = None
        if model_dir is None and last_train is not None:
            summary = read_summary(spec.output_dir, last_train, endpoint)
            model_dir, untrained = summary["model_dir"], summary["model_source"]
        return run_eval_stage(stage_spec, stage, model_dir or starting_model(stage_spec, stage),
                              untrained_dir=untrained)
    if stage.kind == "tune":
        from medvl.tune.stage import run_tune_stage
        from medvl.tune.tracking import search_callbacks

        callbacks = search_callbacks(stage_spec, stage, log.ref if log else None)
        return run_tune_stage(stage_spec, stage, start_from=start_from, callbacks=callbacks)["complete"]
    if stage.kind == "serve":
        from medvl.serve.command import run_serve_stage

        return run_serve_stage(stage_spec, stage, last_train)  # blocks until SIGINT/SIGTERM
    if stage.kind == "compare":
        from medvl.tracking.compare import write_comparison

        layout = RunLayout.for_spec(spec)
        rows = write_comparison([layout.root], stage_spec.compare.metrics, layout.comparison_md)
        print(f"[medvl compare] {len(rows)} rows → {layout.comparison_md}", flush=True)
        return rows
    raise NotImplementedError(f"stage kind {stage.kind!r} is not implemented yet")


def starting_model(spec: JobSpec, stage: StageSpec) -> str:
    """What an eval stage with no trained model before it scores: the model a train stage would start from.

    That is ``model.name_or_path``, or for ``model.preset`` the same deterministic random-init model every train
    stage of the job builds (a zero-shot baseline of the untrained base).
    """
    if not spec.model.preset:
        return spec.model.name_or_path
    from medvl.models.registry import build_recipe
    from medvl.train.trainer import training_texts

    from medvl.models.cache import initial_model_in

    return initial_model_in(build_recipe(spec), RunLayout.for_spec(spec).stage(stage.name),
                            lambda: training_texts(spec))


def _record(spec: JobSpec, stage: StageSpec, outcome, log, tracker) -> None:
    """Log what a finished stage left to its run (and its headline numbers to the command's run)."""
    import json

    from medvl.tracking.compare import HEADLINE_METRICS, MODEL_DIR_TAG

    layout, endpoint = RunLayout.for_spec(spec), spec.data.endpoint_url
    if stage.kind == "prepare":
        counts = {f"rows_{split}": n for split, n in outcome["counts"].items()}
        log.log_metrics(counts | {"rows_skipped": sum(outcome.get("skipped", {}).values())})
    elif stage.kind == "train":
        summary = read_summary(spec.output_dir, stage.name, endpoint)
        log.set_tag(MODEL_DIR_TAG, summary["model_dir"])
        log.log_metrics({k: summary[k] for k in TRAIN_COSTS if k in summary}, summary.get("steps"))
        tracker.log_to_parent({k: summary[k] for k in TRAIN_COSTS[:3] if k in summary}, stage.name)
        log.log_artifact(layout.summary(stage.name))
    elif stage.kind == "eval":
        cost = json.loads(layout.eval_summary(stage.name).read_text())
        log.set_tag(MODEL_DIR_TAG, cost["model_dir"])
        log.log_metrics(outcome | {k: cost[k] for k in ("wall_time_s", "samples_per_s")})
        tracker.log_to_parent({k: v for k, v in outcome.items() if k in HEADLINE_METRICS}, stage.name)
        for path in (layout.metrics(stage.name), layout.report(stage.name), layout.eval_summary(stage.name),
                     layout.attention(stage.name), layout.comparison(spec.name)):
            log.log_artifact(path)
    elif stage.kind == "tune":
        tune = TuneLayout(layout.stage(stage.name))
        if tune.summary.exists():
            log.log_metrics({k: v for k, v in read_summary(spec.output_dir, stage.name, endpoint).items()
                             if k.startswith("best_")})
        for path in (tune.trials_csv, tune.trials_md, tune.curves, tune.best_spec, tune.settings):
            log.log_artifact(path)
    elif stage.kind == "compare":
        for path in (layout.comparison_md, layout.comparison_png):
            log.log_artifact(path)
            tracker.log_artifact(path)
