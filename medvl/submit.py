"""``medvl submit|status|logs|stop``: run a job spec on a Ray cluster through Ray's Jobs API.

``medvl submit SPEC --address http://HEAD:8265`` validates the spec with its ``--set`` overrides on this machine
(a bad spec fails before anything is sent), then submits ``python -m medvl.cli run SPEC --set …`` with a
runtime_env: the working directory, uploaded, so the code and specs that run are the ones submitted; pip
requirements if asked for (none by default: the cluster's image provides medvl's dependencies); environment
variables. The job's driver runs on the head node, in its copy of the working directory, and joins that cluster
through the ``RAY_ADDRESS`` Ray sets for every job (``medvl/runtime.py``). ``status``, ``logs`` and ``stop`` take
the job id ``submit`` prints. Every command talks to the dashboard's HTTP address (``--address``, else
``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, else http://127.0.0.1:8265).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvl.spec import JobSpec, SpecError
from medvl.validation import load_valid_spec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray's client lets these variables override the address it is given; an explicit --address must win.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Never uploaded (Ray also honours the working dir's .gitignore and .rayignore). Ray refuses a working dir whose
# zip exceeds 512 MiB (the GCS's gRPC message limit): environments, caches and run outputs must stay out.
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                        ".benchmarks", "/runs"]
# Secrets never travel, whatever .gitignore says: the uploaded package sits in the cluster's object store and
# on every node of it. (gitignore patterns: each matches at any depth.)
SECRET_EXCLUDES = [".env", ".env.*", ".envrc", "env/", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*",
                   "id_ed25519*", ".ssh/", ".aws/", ".netrc", ".git-credentials", ".pypirc", ".npmrc",
                   "credentials.json", "*.kubeconfig", "kubeconfig"]
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A problem with the submission's own arguments, phrased as one line."""


# --------------------------------------------------------------------------------------------- command line


def add_job_commands(commands: Any, add_overrides: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``submit``, ``status``, ``logs`` and ``stop`` on ``medvl``'s subcommand parsers."""
    submit = commands.add_parser(
        "submit", help="run a job spec on a Ray cluster (Ray Jobs API)",
        epilog="Never uploaded: " + ", ".join(WORKING_DIR_EXCLUDES + SECRET_EXCLUDES) + ", whatever .gitignore and "
               ".rayignore list, and the spec's output folders inside the working dir.")
    submit.add_argument("spec")
    add_overrides(submit)
    _add_address(submit)
    submit.add_argument("--working-dir", default=".", metavar="DIR",
                        help="folder uploaded as the job's working directory, holding the spec (default: .)")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="a pip requirement installed for the job (repeatable; default none: the cluster's "
                             "image has medvl's dependencies)")
    submit.add_argument("--requirements", metavar="FILE", help="a requirements file installed for the job")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable)")
    submit.add_argument("--env-from-driver", action="append", default=[], metavar="NAME",
                        help="copy NAME's value from this shell, e.g. AWS_ACCESS_KEY_ID (repeatable; never printed "
                             "here, but the value is stored in the job's runtime_env, which anyone who can open "
                             "the Ray dashboard can read)")
    submit.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 1 unless it succeeded")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="a submitted job's status")
    status.add_argument("job_id")
    _add_address(status)
    status.set_defaults(handler=cmd_status)

    logs = commands.add_parser("logs", help="a submitted job's logs")
    logs.add_argument("job_id")
    _add_address(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit 1 unless it succeeded")
    logs.set_defaults(handler=cmd_logs)

    stop = commands.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job_id")
    _add_address(stop)
    stop.set_defaults(handler=cmd_stop)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: "
                                          f"$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def _one_line_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad arguments exit 2, a cluster that cannot be reached or refuses the request exits 1: one line each."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SpecError:
            raise  # the CLI's own one-line spec error (exit 2)
        except SubmitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError, ValueError) as exc:  # ConnectionError, the job server's refusals
            print(f"error: {first_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
            return 1

    return wrapper


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------------- commands


@_one_line_errors
def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_valid_spec(args.spec, args.overrides)  # a bad spec fails here, before anything is sent
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {args.working_dir}: no such folder")
    spec_path = spec_path_in(working_dir, args.spec)
    env_vars = job_env_vars(args.env, args.env_from_driver, os.environ)
    runtime_env = job_runtime_env(spec, working_dir, pip_requirements(args.pip, args.requirements), env_vars)
    command = entrypoint(spec_path, args.overrides)
    for warning in [check_output_dir(spec), *outside_paths(spec, working_dir)]:
        if warning:
            print(warning, file=sys.stderr)

    client = connect(args.address)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=args.submission_id,
                               metadata={"medvl_job": spec.name, "medvl_spec": spec_path})
    print(job_id, flush=True)  # alone on stdout: JOB=$(medvl submit …) works
    address = f" --address {client.get_address()}"
    print(f"submitted to {client.get_address()}: {command}", file=sys.stderr)
    if env_vars:
        print(f"env: {', '.join(sorted(env_vars))} (values not shown)", file=sys.stderr)
    print(f"then: medvl logs|status|stop {job_id}{address}", file=sys.stderr, flush=True)
    return follow(client, job_id) if args.follow else 0


@_one_line_errors
def cmd_status(args: argparse.Namespace) -> int:
    info = connect(args.address).get_job_info(args.job_id)
    message = f" ({first_line(info.message)})" if info.message else ""  # a failure's message goes on with its logs
    print(f"{args.job_id}: {status_text(info.status)}{message}")
    return 0


@_one_line_errors
def cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        return follow(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    sys.stdout.flush()
    return 0


@_one_line_errors
def cmd_stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if client.stop_job(args.job_id):
        print(f"{args.job_id}: stop requested")
    else:
        print(f"{args.job_id}: not running ({status_text(client.get_job_status(args.job_id))})")
    return 0


# --------------------------------------------------------------------------------------------- the submission


def entrypoint(spec_path: str, overrides: list[str]) -> str:
    """The job's shell command. ``python -m`` runs the uploaded medvl (the working dir comes first on sys.path)."""
    words = ["python", "-m", "medvl.cli", "run", spec_path]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def spec_path_in(working_dir: Path, spec: str) -> str:
    """The spec's path inside the uploaded working dir, as the job will see it."""
    try:
        return Path(spec).resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(f"{spec}: expected a spec inside the working dir {working_dir} (only it is uploaded)") \
            from None


def job_runtime_env(spec: JobSpec, working_dir: Path, pip: list[str], env_vars: dict[str, str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": working_dir_excludes(spec, working_dir)}
    if pip:
        runtime_env["pip"] = pip  # Ray installs them into a virtualenv on top of the cluster's own packages
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def working_dir_excludes(spec: JobSpec, working_dir: Path) -> list[str]:
    """The standard excludes, plus the spec's own output folders where they lie inside the working dir."""
    extra = []
    for location in (spec.output_dir, spec.data.shards, spec.train.storage_path):
        if location and "://" not in location:
            try:
                inside = Path(location).resolve().relative_to(working_dir).as_posix()
            except ValueError:
                continue
            if inside != ".":
                extra.append(f"/{inside}")
    return WORKING_DIR_EXCLUDES + SECRET_EXCLUDES + extra


def pip_requirements(packages: list[str], requirements_file: str | None) -> list[str]:
    lines = list(packages)
    if requirements_file:
        try:
            text = Path(requirements_file).read_text()
        except OSError:
            raise SubmitError(f"--requirements {requirements_file}: no such file") from None
        lines += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def job_env_vars(pairs: list[str], from_driver: list[str], environ: Any) -> dict[str, str]:
    env_vars: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {key or '(no name)'}: expected KEY=VALUE")
        env_vars[key] = value
    for name in from_driver:
        if name not in environ:
            raise SubmitError(f"--env-from-driver {name}: not set in this shell")
        env_vars[name] = environ[name]
    return env_vars


def check_output_dir(spec: JobSpec) -> str | None:
    """A one-line warning for an output_dir nobody could read after the job."""
    if "://" in spec.output_dir or Path(spec.output_dir).is_absolute():
        return None
    return (f'warning: output_dir "{spec.output_dir}" is relative: on the cluster it lands in the job\'s temporary '
            f"copy of the working dir; use object storage or a folder every node shares, e.g. "
            f"--set output_dir=s3://your-bucket/runs/{spec.name}")


def input_paths(spec: JobSpec) -> dict[str, str]:
    """The local files and folders a job reads (field → path): datasets, models, configs. Hub ids, URLs and
    what the job writes (output_dir, checkpoints) are left out."""
    paths = {"data.source": spec.data.source if spec.data.format != "synthetic" else "",
             "data.shards": spec.data.shards if spec.data.format == "shards" else "",
             "train.deepspeed.config_file": spec.train.deepspeed.config_file,
             "eval.embedding_model": spec.eval.embedding_model}
    models = {"serve.checkpoint": spec.serve.checkpoint}  # these may also be hub ids
    if not spec.model.preset:
        models["model.name_or_path"] = spec.model.name_or_path
        if spec.model.recipe.startswith("softprompt"):
            models["model.vision_name_or_path"] = spec.model.vision_name_or_path
    paths |= {name: path for name, path in models.items() if _local_path(path)}
    return {name: path for name, path in paths.items() if path and "://" not in path}


def _local_path(text: str) -> bool:
    """A path rather than a hub id ("gpt2", "org/name"): it exists here or is spelled like a path."""
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def outside_paths(spec: JobSpec, working_dir: Path) -> list[str]:
    """One warning per local path a stage reads that the upload does not carry (outside ``working_dir``)."""
    warnings, seen = [], set()
    stage_specs = [spec.for_stage(stage) for stage in spec.stages] or [spec]
    for stage_spec in stage_specs:
        for name, path in input_paths(stage_spec).items():
            resolved = (working_dir / Path(path).expanduser()).resolve()
            if (name, path) in seen or resolved.is_relative_to(working_dir):
                continue
            seen.add((name, path))
            where = ("it is read on the cluster's nodes, which must have it" if Path(path).expanduser().is_absolute()
                     else "the job's copy of the working dir will not have it")
            warnings.append(f'warning: {name} "{path}" is outside the uploaded working dir {working_dir}: {where}; '
                            "move it inside, or use object storage / a path every node mounts")
    return warnings


# --------------------------------------------------------------------------------------------- the cluster


def connect(address: str | None) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    resolved = address or next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), DEFAULT_ADDRESS)
    with _without_address_variables():
        return JobSubmissionClient(resolved)


@contextmanager
def _without_address_variables() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def status_text(status: Any) -> str:
    return str(getattr(status, "value", status))


def follow(client: JobSubmissionClient, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it succeeded, 1 otherwise."""
    try:
        asyncio.run(_stream_logs(client, job_id))
        status = wait_until_finished(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (medvl stop {job_id} ends it)", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


async def _stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_until_finished(client: JobSubmissionClient, job_id: str, timeout_s: float = 30.0) -> str:
    """The log stream closes when the job ends; its final status may take a moment to be recorded."""
    deadline = time.monotonic() + timeout_s
    status = status_text(client.get_job_status(job_id))
    while status not in FINISHED and time.monotonic() < deadline:
        time.sleep(0.5)
        status = status_text(client.get_job_status(job_id))
    return status
