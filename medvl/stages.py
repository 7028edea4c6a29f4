"""Run a job spec's stages in order, handing each train stage's model to the stages after it."""
from __future__ import annotations

from medvl.runs import read_summary, stage_model
from medvl.spec import JobSpec, StageSpec


def run_stages(spec: JobSpec, kinds: tuple[str, ...] | None = None, model_dir: str | None = None) -> None:
    """Run every stage (or only those of ``kinds``); ``model_dir`` overrides the model an eval stage scores."""
    from medvl.resources import ResourceCheck
    from medvl.runtime import ray_session

    selected = [stage for stage in spec.stages if kinds is None or stage.kind in kinds]
    with ray_session(spec) as stop_signals:
        resources = ResourceCheck(spec)
        resources.before_all(selected)  # without an autoscaler a stage asking too much fails before any runs
        check_java(spec, selected)
        last_train: str | None = None
        for stage in spec.stages:
            if stage in selected:
                stop_signals.rearm()  # Ray Train leaves its own SIGINT handler behind after a fit
                resources.before(stage)
                if _run_stage(spec, stage, last_train, model_dir) is False:
                    return  # an interrupted search: the stages after it wait for the resumed run
            if stage.kind in ("train", "tune"):  # a tune stage's best trial is a trained model too
                last_train = stage.name


def check_java(spec: JobSpec, stages: list[StageSpec]) -> None:
    """An eval stage that needs Java and lacks it fails before the job's first stage, not after training."""
    from medvl.eval.evaluate import java_reason
    from medvl.models.registry import build_recipe

    for stage in stages:
        if stage.kind == "eval":
            stage_spec = spec.for_stage(stage)
            java_reason(stage_spec, build_recipe(stage_spec))


def _run_stage(spec: JobSpec, stage: StageSpec, last_train: str | None, model_dir: str | None) -> bool | None:
    stage_spec = spec.for_stage(stage)
    endpoint = spec.data.endpoint_url
    start_from = stage_model(spec.output_dir, stage.start_from, endpoint) if stage.start_from else None
    print(f"[medvl] stage {stage.name} ({stage.kind})", flush=True)
    if stage.kind == "prepare":
        from medvl.data.prepare import run_prepare_stage

        run_prepare_stage(stage_spec)
    elif stage.kind == "train":
        from medvl.train.trainer import run_train_stage

        run_train_stage(stage_spec, stage, start_from=start_from)
    elif stage.kind == "eval":
        from medvl.eval.evaluate import run_eval_stage

        untrained = None
        if model_dir is None and last_train is not None:
            summary = read_summary(spec.output_dir, last_train, endpoint)
            model_dir, untrained = summary["model_dir"], summary["model_source"]
        run_eval_stage(stage_spec, stage, model_dir or spec.model.name_or_path, untrained_dir=untrained)
    elif stage.kind == "tune":
        from medvl.tune.stage import run_tune_stage

        return run_tune_stage(stage_spec, stage, start_from=start_from)["complete"]
    elif stage.kind == "serve":
        from medvl.serve.command import run_serve_stage

        run_serve_stage(stage_spec, stage, last_train)  # blocks until SIGINT/SIGTERM
    else:
        raise NotImplementedError(f"stage kind {stage.kind!r} is not implemented yet")
