"""Experiment tracking, live progress and comparison.

Without Ray: the tracking section validates; progress never redraws in a pipe; a command's output is split between
the terminal (medvl's own lines) and ``medvl.log`` (everything else, file descriptor 2 included); ``medvl compare``
joins each eval stage to the model it scored; TensorBoard and W&B get the same metrics (W&B only with its package
and key).

With Ray: the shipped ablation job's tiny command (its header's own words) run as a user runs it, output piped to a
file. The MLflow store under its folder then holds a parent run for the command, a child per stage, the spec as
params, step metrics and eval metrics; ``comparison.md`` has the four rows with their wall times; the piped output
has no carriage return. Another test logs a run to a real ``mlflow server`` on 127.0.0.1. A search's child run per
trial is checked by the ASHA search in ``test_tune.py``, and ``medvl tune``'s piped progress line by the
multi-node job in ``test_multinode.py`` (both run a search anyway).
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medvl.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[1]
ABLATION_JOB = REPO / "jobs" / "roco_finetune_ablation.yaml"


def tiny_spec(output_dir: Path, **tracking) -> dict:
    return {"name": "tracked", "output_dir": str(output_dir), "stages": ["prepare", "compare"],
            "data": {"format": "synthetic", "synthetic_images": 40, "synthetic_image_size": 32, "image_size": 32,
                     "records_per_shard": 40},
            "tracking": tracking}


# ------------------------------------------------------------------------------------------------- no Ray


def test_the_tracking_section_names_a_bad_field():
    with pytest.raises(SpecError, match=r'^tracking.uri: expected an MLflow tracking URI .*, got "mlflow"'):
        parse_spec(tiny_spec(Path("out"), uri="mlflow"))
    with pytest.raises(SpecError, match=r"^tracking.log_every_steps: expected a positive number, got 0"):
        parse_spec(tiny_spec(Path("out"), log_every_steps=0))
    assert parse_spec(tiny_spec(Path("out"))).tracking.enabled  # on by default


def test_the_spec_becomes_dotted_params():
    from medvl.tracking.mlflow_store import flatten

    params = flatten(parse_spec(tiny_spec(Path("out"))))
    assert params["train.lr"] == "5e-05" and params["data.format"] == "synthetic"
    assert params["train.deepspeed.stage"] == "2" and params["tracking.enabled"] == "true"
    assert json.loads(params["stages"])[1]["kind"] == "compare"
    assert all(isinstance(v, str) for v in params.values())


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_pipe_prints_one_plain_line_per_interval_and_at_the_end():
    from medvl.tracking.progress import Progress

    piped = io.StringIO()
    progress = Progress("train decoder", total=100, unit="steps", every_s=3600, stream=piped)
    progress.update(10, loss=2.5)  # within the interval: nothing
    progress.every_s = 0
    progress.update(50, loss=1.25)
    progress.note("validation at step 50: val_loss 1.1000")
    progress.close()
    progress.close()
    lines = piped.getvalue().splitlines()
    assert "\r" not in piped.getvalue()
    assert len(lines) == 2, lines  # the interval's line and the note; close repeats nothing new
    assert lines[0].startswith("[medvl train decoder] 50/100 steps (50%), loss 1.25, ")
    assert "ETA 0:00:0" in lines[0]
    assert lines[1] == "[medvl train decoder] validation at step 50: val_loss 1.1000"


def test_progress_on_a_terminal_draws_a_bar():
    from medvl.tracking.progress import Progress

    terminal = FakeTerminal()
    progress = Progress("eval", total=4, unit="generated", stream=terminal)
    progress.update(4)
    progress.close()
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()


ROUTED = textwrap.dedent("""
    import logging, os, subprocess, sys
    from pathlib import Path
    from medvl.tracking.console import routed_output
    logging.basicConfig(level=logging.INFO)
    with routed_output(Path(sys.argv[1])):
        print("[medvl] mine")
        print("a library's line")
        logging.getLogger("ray.data").info("Execution plan of Dataset ...")
        os.write(2, b"[2026-12-01 E core_worker.cc:2465] written by C++ to descriptor 2\\n")
        subprocess.run(["sh", "-c", "echo a child process >&2; printf '\\033[36m(RayTrainWorker pid=1)\\033[0m "
                                    "[medvl train] x\\n' >&2"])
        print("warning: model.recipe: 'old' is deprecated", file=sys.stderr)
        sys.stdout.write("Loading 1/2\\rLoading 2/2\\n")
    print("[medvl] after")
    os.write(2, b"descriptor 2 is back\\n")
""")


def test_routed_output_shows_medvl_lines_and_logs_the_rest(tmp_path: Path):
    log = tmp_path / "run" / "medvl.log"
    result = subprocess.run([sys.executable, "-c", ROUTED, str(log)], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[medvl] mine", "[medvl] after"]
    # (a child's lines reach the terminal through a reader thread: their order against Python's may vary)
    assert sorted(result.stderr.splitlines()) == ["(RayTrainWorker pid=1) [medvl train] x", "descriptor 2 is back",
                                                  "warning: model.recipe: 'old' is deprecated"]
    logged = log.read_text()
    for line in ("[medvl] mine", "a library's line", "Execution plan of Dataset", "written by C++ to descriptor 2",
                 "a child process", "[medvl train] x", "\nLoading 2/2\n"):
        assert line in logged, line
    assert "\r" not in logged and "after" not in logged


def write_stage(folder: Path, name: str, **files: dict) -> None:
    (folder / name).mkdir(parents=True)
    for file_name, content in files.items():
        (folder / name / f"{file_name}.json").write_text(json.dumps(content))
        time.sleep(0.01)  # rows are listed in the order their stages finished


def test_compare_joins_each_eval_to_the_model_it_scored(tmp_path: Path):
    from medvl.cli import main

    run = tmp_path / "ablation"
    base = str(run / "zero_shot" / "tiny-init")
    write_stage(run, "zero_shot", eval_summary={"stage": "zero_shot", "model_dir": base, "recipe": "blip_caption",
                                                "wall_time_s": 12.0}, metrics={"cider": 0.03, "bleu_4": 0.0})
    for policy, params, cider in (("decoder", 600_000, 4.3), ("full", 1_500_000, 4.4)):
        model = str(run / policy / "model")
        write_stage(run, policy, train_summary={"stage": policy, "model_dir": model, "recipe": "blip_caption",
                                                "finetune": policy, "trainable_params": params, "steps": 26,
                                                "wall_time_s": 93.0, "samples_per_s": 11.3, "best_val_loss": 1.28})
        write_stage(run, f"eval_{policy}", eval_summary={"stage": f"eval_{policy}", "model_dir": model,
                                                         "wall_time_s": 25.0}, metrics={"cider": cider})
    write_stage(run, "encoder", train_summary={"stage": "encoder", "model_dir": str(run / "encoder" / "model"),
                                               "finetune": "encoder", "wall_time_s": 80.0})  # nobody scored it

    out = tmp_path / "cmp" / "table.md"
    assert main(["compare", str(run), "--metrics", "cider,bleu_4", "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines()[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [("— (untrained base)", "zero_shot"),
                                                        ("decoder", "eval_decoder"), ("full", "eval_full"),
                                                        ("encoder", "—")]
    assert rows[0][3] == "none (zero-shot)" and rows[0][9] == "12.0 s" and rows[0][10] == "0.0300"
    assert rows[1][4:9] == ["600,000", "1 min 33 s", "11.3", "26", "1.2800"] and rows[2][10] == "4.4000"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(tmp_path / "nowhere")]) == 2


def test_tensorboard_and_wandb_get_the_stage_metrics(tmp_path: Path, monkeypatch):
    import types

    from medvl.tracking.mlflow_store import Tracker, wandb_available

    logged: list = []

    class FakeRun:
        def log(self, values, step=None):
            logged.append((values, step))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: logged.append(kwargs["name"]) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("medvl.tracking.mlflow_store.installed", lambda package: package == "wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_available()  # the package alone is not enough
    monkeypatch.setenv("WANDB_API_KEY", "k")

    spec = parse_spec(tiny_spec(tmp_path / "run", enabled=False, tensorboard=True))
    tracker = Tracker(spec)
    log = tracker.stage(spec.stages[0], spec)
    log.log_metrics({"train_loss": 2.0, "note": "not a number"}, step=10)
    log.finish()
    tracker.finish()
    assert logged == ["prepare", ({"train_loss": 2.0}, 10), "finished"]
    assert list((tmp_path / "run" / "tensorboard" / "prepare").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "mlflow.db").exists()  # tracking.enabled: false


def test_the_search_callbacks_survive_pickling(tmp_path: Path):
    """Tune pickles its callbacks with the experiment; a resumed search unpickles and runs them."""
    from ray import cloudpickle

    from medvl.tracking.mlflow_store import RunRef
    from medvl.tune.tracking import SearchProgress, TrialRuns

    progress = SearchProgress("tune", trials=2, metric="val_loss", mode="min", max_steps=4, every_s=30)
    progress.on_trial_result(0, [], type("Trial", (), {"trial_id": "t1"})(), {"step": 2, "val_loss": 1.5})
    assert progress.progress is not None
    restored = cloudpickle.loads(cloudpickle.dumps(progress))
    assert restored.best == 1.5 and restored._progress is None
    runs = TrialRuns(RunRef(f"sqlite:///{tmp_path / 'mlflow.db'}", "1", "parent"), "search", {"name": "x"},
                     str(tmp_path))
    restored = cloudpickle.loads(cloudpickle.dumps(runs))
    assert restored.parent.run_id == "parent" and restored.tags["mlflow.parentRunId"] == "parent"


# ---------------------------------------------------------------------------------------------- with Ray


def header_command(job: Path) -> str:
    """The tiny command of a job file's header comment, lines joined."""
    lines = [line[1:].strip() for line in job.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("medvl run "))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def medvl(args: list[str], log: Path, timeout: int) -> subprocess.CompletedProcess:
    """``medvl ARGS > log 2>&1`` as a user runs it: a fresh process, output to a file (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "medvl.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    """The ablation job's tiny command, output piped to a file, as a user runs it."""
    folder = tmp_path_factory.mktemp("ablation")
    words = shlex.split(header_command(ABLATION_JOB))
    assert words[:3] == ["medvl", "run", "jobs/roco_finetune_ablation.yaml"]
    words = [w if not w.startswith("output_dir=") else f"output_dir={folder / 'run'}" for w in words]
    result = medvl(words[1:], folder / "run.out", timeout=1500)
    assert result.returncode == 0, (folder / "run.out").read_text()[-3000:]

    return folder


def table_rows(markdown: str) -> list[dict[str, str]]:
    lines = [line.strip("|").split(" | ") for line in markdown.strip().splitlines()]
    header = [cell.strip() for cell in lines[0]]
    return [dict(zip(header, (cell.strip() for cell in line))) for line in lines[2:]]


@pytest.mark.slow
def test_the_ablation_compares_four_models_from_the_same_start_with_their_wall_times(ablation: Path):
    run = ablation / "run"
    rows = table_rows((run / "comparison.md").read_text())
    assert [(r["trained by"], r["evaluated by"], r["finetune"]) for r in rows] == [
        ("— (untrained base)", "zero_shot", "none (zero-shot)"), ("decoder", "eval_decoder", "decoder"),
        ("encoder", "eval_encoder", "encoder"), ("full", "eval_full", "full")]
    assert all(re.fullmatch(r"(\d+ min )?\d+(\.\d)? s", r["eval wall time"]) for r in rows)
    assert all(re.fullmatch(r"(\d+ min )?\d+(\.\d)? s", r["train wall time"]) for r in rows[1:])
    trainable = [int(r["trainable params"].replace(",", "")) for r in rows[1:]]
    assert max(trainable[:2]) < trainable[2] and sum(trainable[:2]) <= trainable[2]  # parts of the full model
    for row in rows:
        assert float(row["cider"]) >= 0 and float(row["bleu_4"]) >= 0
    assert (run / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # "From the same start": the zero-shot model and each train stage's starting weights are one and the same.
    starts = {(run / stage / "tiny-init" / "model.safetensors").read_bytes()
              for stage in ("zero_shot", "decoder", "encoder", "full")}
    assert len(starts) == 1
    summary = json.loads((run / "full" / "train_summary.json").read_text())
    for key in ("wall_time_s", "train_time_s", "samples_per_s", "tokens_per_s", "peak_memory_mb", "total_params"):
        assert summary[key] > 0, key
    assert summary["trainable_params"] == summary["total_params"] and summary["samples_trained"] > 0
    cost = json.loads((run / "eval_full" / "eval_summary.json").read_text())
    assert cost["model_dir"] == summary["model_dir"] and cost["samples_per_s"] > 0 and cost["samples"] > 0


@pytest.mark.slow
def test_piped_output_is_medvls_own_lines_without_redraws(ablation: Path):
    output = (ablation / "run.out").read_text()
    assert "\r" not in output
    lines = output.splitlines()
    assert lines[0].endswith(f"output goes to {ablation / 'run' / 'medvl.log'}"), lines[0]
    own = [line for line in lines if line.startswith("[medvl")]
    others = [line for line in lines if not line.startswith("[medvl") and "memory pressure" not in line]
    assert not others, others  # (Ray's notice of workers killed for memory is shown on purpose)
    assert len(set(own)) == len(own), "a line appears twice"
    for stage in ("decoder", "encoder", "full"):
        assert re.search(rf"^\[medvl train {stage}\] \d+/\d+ steps \(100%\), epoch \d+, loss ", output, re.M), stage
        assert f"[medvl train {stage}] validation at step " in output
    assert re.search(r"^\[medvl eval zero_shot\] \d+/\d+ generated \(100%\)", output, re.M)
    logged = (ablation / "run" / "medvl.log").read_text()
    assert "Execution plan of Dataset" in logged and "Execution plan" not in output  # Ray Data's noise is logged


@pytest.mark.slow
def test_the_mlflow_store_holds_a_parent_run_per_command_and_a_child_per_stage(ablation: Path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{ablation / 'run' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = mlflow.search_runs(experiment_names=["roco_finetune_ablation"])
    parent = runs[runs["tags.medvl.kind"] == "job"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["params.model.recipe"] == "blip_caption" and parent.iloc[0]["params.train.lr"] == "0.002"
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == sorted(
        ["prepare", "zero_shot", "decoder", "eval_decoder", "encoder", "eval_encoder", "full", "eval_full", "compare"])
    assert set(children["status"]) == {"FINISHED"}
    by_name = {row["tags.mlflow.runName"]: row for _, row in children.iterrows()}
    assert by_name["decoder"]["params.train.finetune"] == "decoder"  # the stage's own settings
    history = {key: client.get_metric_history(by_name["full"]["run_id"], key)
               for key in ("train_loss", "val_loss", "samples_per_s", "lr", "grad_norm", "tokens_per_s")}
    assert all(history.values()), {k: len(v) for k, v in history.items()}
    assert [m.step for m in history["train_loss"]][:2] == [10, 20]  # every tracking.log_every_steps
    assert len(history["val_loss"]) == 2  # one validation per epoch
    assert by_name["full"]["metrics.wall_time_s"] > 0 and by_name["full"]["metrics.trainable_params"] > 0
    assert 0 <= by_name["eval_full"]["metrics.cider"] and by_name["eval_full"]["metrics.wall_time_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(by_name["eval_full"]["run_id"])}
    assert {"metrics.json", "report.md", "eval_summary.json"} <= artifacts
    assert {"comparison.md", "comparison.png"} <= {a.path for a in client.list_artifacts(parent.iloc[0]["run_id"])}
    assert (ablation / "run" / "mlartifacts").is_dir()




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path: Path):
    """``mlflow server`` on 127.0.0.1 (its own SQLite store and artifact folder), stopped afterwards."""
    import requests

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        yield url, tmp_path / "server-artifacts"
    finally:
        os.killpg(server.pid, 15)  # the server and the workers it started (its own session)
        server.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_a_run_logs_to_a_real_tracking_server(tmp_path: Path, tracking_server, ray_local):
    from mlflow import MlflowClient

    from medvl.stages import run_stages

    url, artifacts = tracking_server
    run_stages(parse_spec(tiny_spec(tmp_path / "run", uri=url)))
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("tracked")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tracked", "prepare", "compare"}
    parent = runs["tracked"]
    assert all(runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id for name in ("prepare", "compare"))
    assert parent.data.params["data.synthetic_images"] == "40"
    assert sum(runs["prepare"].data.metrics[f"rows_{split}"] for split in ("train", "val", "test")) == 40
    assert {a.path for a in client.list_artifacts(runs["compare"].info.run_id)} == {"comparison.md",
                                                                                   "comparison.png"}
    assert list(artifacts.rglob("comparison.md"))  # uploaded through the server, into its artifact store
    assert not (tmp_path / "run" / "mlflow.db").exists()
