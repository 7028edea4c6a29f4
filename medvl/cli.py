"""``medvl`` command line: validate specs, run a job's stages, or one kind of stage."""
from __future__ import annotations

import argparse
import os
import sys

from medvl.runs import MLFLOW_DB
from medvl.runtime import RayConnectError, Stopped
from medvl.serve.auth import DASHBOARD_NOTE as SERVE_KEY_NOTE
from medvl.spec import SpecError
from medvl.submit import add_job_commands
from medvl.validation import load_valid_spec, validate


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RayConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Stopped as exc:  # SIGINT / SIGTERM: Ray is already shut down
        print(f"[medvl] stopped by {exc.signal_name}", file=sys.stderr)
        return exc.code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check job specs (no Ray)")
    validate.add_argument("specs", nargs="+")
    _add_overrides(validate)
    validate.set_defaults(handler=cmd_validate)

    run = commands.add_parser("run", help="run a job spec's stages in order")
    run.add_argument("spec")
    _add_overrides(run)
    run.set_defaults(handler=lambda a: cmd_stages(a, None))

    for kind in ("prepare", "train", "tune", "eval"):
        note = " (a search over tune.space; one stage named tune when the spec lists none)" if kind == "tune" else ""
        sub = commands.add_parser(kind, help=f"run only the spec's {kind} stage(s){note}")
        sub.add_argument("spec")
        _add_overrides(sub)
        if kind == "eval":
            sub.add_argument("--model", help="model folder to evaluate (default: the last train stage's model)")
        sub.set_defaults(handler=lambda a, kind=kind: cmd_stages(a, (kind,)))

    serve = commands.add_parser("serve", help="serve the trained model (or serve.checkpoint) with Ray Serve until "
                                "SIGINT/SIGTERM (a stage named serve when the spec lists none)",
                                epilog=SERVE_KEY_NOTE)
    serve.add_argument("spec")
    _add_overrides(serve)
    serve.add_argument("--write-config", metavar="PATH",
                       help="only write a Serve config file for `serve deploy PATH` (starts nothing)")
    serve.set_defaults(handler=cmd_serve)

    compare = commands.add_parser("compare", help="runs side by side: recipe, finetune policy, parameters, wall "
                                  "time, samples/s, steps, best val loss and eval metrics (no Ray)")
    compare.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="an output_dir, or one stage's folder")
    compare.add_argument("--metrics", default="", help="comma-separated eval metrics, e.g. cider,ce_micro_f1_14 "
                         "(default: the headline metrics the runs have)")
    compare.add_argument("--out", metavar="FILE.md", help="write the table there and a bar chart to FILE.png "
                         "(default: print the table)")
    compare.add_argument("--mlflow", metavar="URI", help="compare the runs of an MLflow experiment instead: "
                         f"http://host:5000, or a run's own store sqlite:////abs/output_dir/{MLFLOW_DB}")
    compare.add_argument("--experiment", help="the MLflow experiment to compare (with --mlflow)")
    compare.set_defaults(handler=cmd_compare)

    plan = commands.add_parser("plan", help="parameters and per-GPU memory of the spec's training under DDP and "
                               "ZeRO-2/3, before renting a GPU (no Ray, nothing allocated)")
    plan.add_argument("spec")
    _add_overrides(plan)
    plan.add_argument("--gpus", type=int, action="append", default=[], metavar="N",
                      help="also plan for N GPUs (repeatable; default: train.workers)")
    plan.add_argument("--stage", help="the train stage whose plan --json puts at the top (default: the first)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=cmd_plan)

    add_job_commands(commands, _add_overrides)  # submit, status, logs, stop: a job on a Ray cluster

    chexpert = commands.add_parser("chexpert", help="label reports with the 14 CheXpert observations (offline)")
    chexpert.add_argument("input_csv")
    chexpert.add_argument("--column", required=True, help="the column holding the report text")
    chexpert.add_argument("--out", required=True, help="output CSV in the CheXpert labeler's layout")
    chexpert.set_defaults(handler=cmd_chexpert)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.lr=1e-4 (repeatable)")


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = load_valid_spec(path, args.overrides)
            print(f"ok: {path} ({spec.name}: {' → '.join(s.name for s in spec.stages)})")
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_stages(args: argparse.Namespace, kinds: tuple[str, ...] | None) -> int:
    spec = load_valid_spec(args.spec, args.overrides)  # fails here, before Ray starts, on a bad spec
    if kinds == ("tune",) and not any(stage.kind == "tune" for stage in spec.stages):
        spec = with_stage(spec, "tune")  # `medvl tune` on a spec whose stages list none (tune.space is checked)
    from medvl.stages import run_stages

    run_stages(spec, kinds, model_dir=getattr(args, "model", None))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    spec = load_valid_spec(args.spec, args.overrides)
    if not any(stage.kind == "serve" for stage in spec.stages):
        spec = with_stage(spec, "serve")
    if args.write_config:
        from pathlib import Path

        from medvl.runs import model_stage_before
        from medvl.serve.command import write_config

        stage = next(stage for stage in spec.stages if stage.kind == "serve")
        write_config(spec.for_stage(stage), model_stage_before(spec.stages, stage.name), Path(args.write_config))
        print(f"wrote {args.write_config}: deploy it with `serve deploy {args.write_config}`")
        return 0
    from medvl.stages import run_stages

    run_stages(spec, ("serve",))  # returns after SIGINT/SIGTERM has shut Serve down
    return 0


def with_stage(spec, kind: str):
    """The spec with one more stage of ``kind``, named after it, at the end."""
    import dataclasses

    from medvl.spec import StageSpec, parse_spec

    raw = dataclasses.asdict(spec)
    raw["stages"].append(dataclasses.asdict(StageSpec(kind=kind, name=kind)))
    return validate(parse_spec(raw))


def cmd_compare(args: argparse.Namespace) -> int:
    from medvl.storage import Location
    from medvl.tracking.compare import rows_from_mlflow, write_comparison

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if bool(args.run_dirs) == bool(args.mlflow) or (args.mlflow and not args.experiment):
        print("error: compare: give RUN_DIR… or --mlflow URI --experiment NAME", file=sys.stderr)
        return 2
    missing = [d for d in args.run_dirs if not Location.of(d).is_dir()]
    if missing:
        print(f"error: compare: {missing[0]}: no such folder", file=sys.stderr)
        return 2
    try:
        rows = rows_from_mlflow(args.mlflow, args.experiment) if args.mlflow else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = write_comparison(args.run_dirs, metrics, Location.of(args.out) if args.out else None, rows)
    if not rows:
        print("error: compare: no train or eval stage found", file=sys.stderr)
        return 2
    if args.out:
        print(f"wrote {args.out} ({len(rows)} rows) and {os.path.splitext(args.out)[0]}.png")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_valid_spec(args.spec, args.overrides)
    if any(n < 1 for n in args.gpus):
        print(f"error: --gpus: expected a positive number of GPUs, got {min(args.gpus)}", file=sys.stderr)
        return 2
    import json

    from medvl.plan import format_plan, job_json, plan_job, select_stage

    try:
        plans = plan_job(spec, args.gpus)
        select_stage(plans, args.stage)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(job_json(plans, args.stage), indent=2) if args.json else "\n\n".join(map(format_plan, plans)))
    return 0


def cmd_chexpert(args: argparse.Namespace) -> int:
    from medvl.eval.chexpert_csv import label_csv

    try:
        rows = label_csv(args.input_csv, args.column, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"labelled {rows} reports → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
