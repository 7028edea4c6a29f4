"""``medvl submit|status|logs|stop``: what is sent to the Jobs API (no Ray), then real jobs on a real local head."""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from medvl.cli import build_parser, main
from medvl.spec import load_spec
from medvl.submit import input_paths, outside_paths
from tests.ray_head import free_port, running_head

REPO = Path(__file__).resolve().parents[1]


def with_sets(overrides: list[str]) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


# --------------------------------------------------------------------------------------------- no Ray


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient and records what the CLI asks of it."""

    made: ClassVar[list[FakeClient]] = []
    status: ClassVar[str] = "SUCCEEDED"

    def __init__(self, address: str, **_: object) -> None:
        self.address = address
        self.ray_address_seen = os.environ.get("RAY_ADDRESS")
        self.submitted: list[dict] = []
        self.stopped: list[str] = []
        FakeClient.made.append(self)

    def get_address(self) -> str:
        return self.address

    def submit_job(self, **kwargs: object) -> str:
        self.submitted.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        return JobStatus(FakeClient.status)

    async def tail_job_logs(self, job_id: str):
        for chunk in ("[medvl] stage prepare (prepare)\n", "[medvl] stage train (train)\n"):
            yield chunk

    def stop_job(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        return True


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeClient.made, FakeClient.status = [], "SUCCEEDED"
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.chdir(REPO)
    return FakeClient


def test_submit_sends_the_run_command_and_runtime_env_it_was_given(fake_client, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")  # an explicit --address wins over it
    monkeypatch.setenv("MEDVL_TEST_SECRET", "s3cr3t-value-1234")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# extras for the job\nrapidfuzz>=3.0\n\n  boto3  \n")
    out_dir = tmp_path / "out dir"  # a space: the command must survive the shell
    overrides = ["train.lr=1e-3", f"output_dir={out_dir}", "eval.baselines=[untrained]"]

    rc = main(["submit", "jobs/quickstart.yaml", *with_sets(overrides),
               "--address", "http://head:8265", "--env", "HF_HUB_OFFLINE=1", "--env-from-driver", "MEDVL_TEST_SECRET",
               "--pip", "rich==13.7.1", "--requirements", str(requirements), "--submission-id", "medvl-test-1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (client,) = fake_client.made
    assert client.address == "http://head:8265" and client.ray_address_seen is None
    assert os.environ["RAY_ADDRESS"] == "http://elsewhere:8265"  # put back afterwards
    (sent,) = client.submitted
    assert captured.out.splitlines() == ["medvl-test-1"]  # the job id, alone on stdout

    words = shlex.split(sent["entrypoint"])
    assert words[:3] == ["python", "-m", "medvl.cli"]
    args = build_parser().parse_args(words[3:])
    assert (args.command, args.spec, args.overrides) == ("run", "jobs/quickstart.yaml", overrides)
    assert load_spec(args.spec, args.overrides).output_dir == str(out_dir)

    env = sent["runtime_env"]
    assert env["working_dir"] == str(REPO)
    assert {".git", ".venv", "/runs"} <= set(env["excludes"])
    assert env["pip"] == ["rich==13.7.1", "rapidfuzz>=3.0", "boto3"]
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", "MEDVL_TEST_SECRET": "s3cr3t-value-1234"}
    assert sent["submission_id"] == "medvl-test-1"
    assert sent["metadata"] == {"medvl_job": "quickstart", "medvl_spec": "jobs/quickstart.yaml"}
    assert "s3cr3t" not in captured.out + captured.err
    assert "MEDVL_TEST_SECRET" in captured.err  # the names are shown, the values are not
    assert "warning" not in captured.err  # an absolute output_dir


def test_a_relative_output_dir_warns_in_one_line_and_is_not_uploaded(fake_client, capsys):
    assert main(["submit", "jobs/quickstart.yaml"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and 'output_dir "runs/quickstart" is relative' in warnings[0]
    assert "s3://" in warnings[0]  # object storage is the way out
    (client,) = fake_client.made
    assert client.address == "http://127.0.0.1:8265"
    sent = client.submitted[0]
    assert "/runs/quickstart" in sent["runtime_env"]["excludes"]
    assert "pip" not in sent["runtime_env"] and "env_vars" not in sent["runtime_env"]


def test_a_spec_naming_a_path_outside_the_working_dir_warns_per_field(fake_client, capsys, tmp_path):
    outside = tmp_path / "roco"  # absolute, outside the repository
    argv = ["submit", "jobs/quickstart.yaml", "--set", "output_dir=s3://bucket/runs/q", "--set", "data.format=roco",
            "--set", "data.source=../elsewhere/roco", "--set", f"eval.embedding_model={outside}"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings  # an s3:// output_dir is fine
    assert 'data.source "../elsewhere/roco" is outside the uploaded working dir' in warnings[0]
    assert "will not have it" in warnings[0]
    assert f'eval.embedding_model "{outside}"' in warnings[1] and "must have it" in warnings[1]


def test_paths_inside_the_working_dir_and_hub_ids_do_not_warn():
    spec = load_spec(REPO / "jobs/quickstart.yaml", ["data.format=roco", "data.source=data/roco",
                                                     "model.preset=", "model.name_or_path=Salesforce/blip-x"])
    assert outside_paths(spec, REPO) == []
    assert input_paths(spec) == {"data.source": "data/roco"}


# Absolute paths a shipped spec may name: mount points the cluster configs provide and a user fills
# (cluster/kuberay-rayjob.yaml mounts /data and /mnt/shared); anything else must be inside the project.
PLACEHOLDER_MOUNTS = ("/data/", "/mnt/")


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_name_paths_inside_the_project_or_mount_placeholders(path):
    spec = load_spec(path)
    for stage_spec in [spec.for_stage(stage) for stage in spec.stages]:
        named = {**input_paths(stage_spec), "output_dir": stage_spec.output_dir, "data.shards": stage_spec.data.shards,
                 "train.storage_path": stage_spec.train.storage_path}
        for name, value in named.items():
            if not value or "://" in value:
                continue
            if Path(value).is_absolute():
                assert value.startswith(PLACEHOLDER_MOUNTS), f"{path.name}: {name} {value}"
            else:
                assert (REPO / value).resolve().is_relative_to(REPO), f"{path.name}: {name} {value} leaves the project"
    assert not [w for w in outside_paths(spec, REPO) if "will not have it" in w]


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.lr=fast"], 'error: train.lr: expected a positive number, got "fast"'),
    (["--env-from-driver", "MEDVL_NOT_SET_ANYWHERE"], "error: --env-from-driver MEDVL_NOT_SET_ANYWHERE: not set"),
    (["--env", "NOVALUE"], "error: --env NOVALUE: expected KEY=VALUE"),
    (["--working-dir", "medvl"], "error: jobs/quickstart.yaml: expected a spec inside the working dir"),
    (["--requirements", "no-such-requirements.txt"], "error: --requirements no-such-requirements.txt: no such file"),
])
def test_bad_arguments_fail_in_one_line_before_anything_is_sent(fake_client, capsys, argv, message):
    assert main(["submit", "jobs/quickstart.yaml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert fake_client.made == []  # never connected


@pytest.mark.parametrize("status, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_follow_streams_the_logs_and_exits_by_the_jobs_status(fake_client, capsys, status, code):
    fake_client.status = status
    assert main(["submit", "jobs/quickstart.yaml", "--set", "output_dir=/tmp/x", "--follow"]) == code
    out, err = capsys.readouterr()
    assert out.splitlines() == ["raysubmit_fake", "[medvl] stage prepare (prepare)", "[medvl] stage train (train)"]
    assert f"job raysubmit_fake: {status}" in err
    assert main(["logs", "raysubmit_fake", "--follow"]) == code


def test_stop_asks_the_cluster_to_stop_the_job(fake_client, capsys):
    assert main(["stop", "raysubmit_abc", "--address", "http://head:8265"]) == 0
    assert fake_client.made[0].stopped == ["raysubmit_abc"]
    assert "raysubmit_abc: stop requested" in capsys.readouterr().out


def test_an_unreachable_cluster_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["status", "raysubmit_abc", "--address", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------- a real head


# The quickstart cut down to seconds of work: 160 small images, one epoch, 8 test samples, no baselines.
TINY = ["data.synthetic_images=160", "data.synthetic_image_size=64", "data.image_size=64",
        "data.records_per_shard=64", "train.epochs=1", "train.batch_size=16", "train.max_val_batches=2",
        "eval.max_samples=8", "eval.num_beams=1", "eval.max_new_tokens=8", "eval.batch_size=8",
        "eval.baselines=[]", "eval.semantic=false"]
STAGE_LINES = [f"[medvl] stage {kind} ({kind})" for kind in ("prepare", "train", "eval")]


@pytest.fixture(scope="module")
def ray_head():
    """A real head of this module's own (tests/ray_head.py): its Jobs API address."""
    with running_head() as head:
        yield head.dashboard


@pytest.mark.slow
def test_submit_runs_the_quickstart_on_a_cluster_to_success(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "run"
    started = time.monotonic()
    rc = main(["submit", "jobs/quickstart.yaml", *with_sets(TINY), "--set", f"output_dir={out_dir}",
               "--address", ray_head, "--follow"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:] + captured.out[-4000:]
    print(f"quickstart job: {time.monotonic() - started:.0f} s", file=sys.stderr)
    job_id = captured.out.splitlines()[0]
    assert all(line in captured.out for line in STAGE_LINES)  # streamed while it ran

    assert main(["status", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    assert main(["logs", job_id, "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert all(line in logs for line in STAGE_LINES)
    # The driver joined this head (RAY_ADDRESS) rather than starting a Ray of its own (Ray's own lines say so in
    # the run's medvl.log; the job's log holds medvl's).
    assert "[medvl] ray: joined " in logs and "[medvl] ray: started a local Ray" not in logs
    ray_lines = (out_dir / "medvl.log").read_text()
    assert "Connecting to existing Ray cluster" in ray_lines and "Started a local Ray instance" not in ray_lines

    metrics = json.loads((out_dir / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8
    summary = json.loads((out_dir / "train" / "train_summary.json").read_text())
    assert summary["steps"] > 0 and Path(summary["model_dir"]).is_dir()


@pytest.mark.slow
def test_a_failing_job_makes_follow_exit_nonzero(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    missing = tmp_path / "no-roco-here"  # valid spec, but the dataset folder does not exist on the cluster
    rc = main(["submit", "jobs/quickstart.yaml", "--set", "data.format=roco", "--set", f"data.source={missing}",
               "--set", f"output_dir={tmp_path / 'run'}", "--address", ray_head, "--follow"])
    captured = capsys.readouterr()
    assert rc == 1, captured.out[-3000:]
    job_id = captured.out.splitlines()[0]
    assert f"job {job_id}: FAILED" in captured.err
    assert "[medvl] stage prepare (prepare)" in captured.out and str(missing) in captured.out
    assert main(["status", job_id, "--address", ray_head]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"{job_id}: FAILED") and len(status.splitlines()) == 1, status


@pytest.mark.slow
def test_stop_stops_a_running_job(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["submit", "jobs/quickstart.yaml", "--set", f"output_dir={tmp_path / 'run'}",
                 "--address", ray_head]) == 0
    job_id = capsys.readouterr().out.splitlines()[0]
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert f"{job_id}: stop requested" in capsys.readouterr().out
    deadline = time.monotonic() + 60
    while True:
        assert main(["status", job_id, "--address", ray_head]) == 0
        if capsys.readouterr().out.startswith(f"{job_id}: STOPPED"):
            break
        assert time.monotonic() < deadline, "the job did not stop within 60 s"
        time.sleep(1)


def test_secrets_are_never_uploaded_even_when_gitignore_omits_them(tmp_path, capsys):
    """Ray's own matcher over the excludes medvl sends: what would go into the working-dir package."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    from medvl.spec import parse_spec
    from medvl.submit import working_dir_excludes

    secrets = [".env", ".env.production", "env/aws.txt", "deploy/server.pem", "tls.key", ".ssh/id_ed25519",
               ".aws/credentials", "nested/.env", "id_rsa"]
    kept = ["train.py", "jobs/job.yaml", "environment.md", "deploy/notes.txt"]
    for name in secrets + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / ".gitignore").write_text("*.log\n")  # lists none of them
    spec = parse_spec({"name": "t", "output_dir": "/mnt/shared/t", "stages": ["prepare"]})
    uploaded = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, working_dir_excludes(spec, tmp_path))],
                lambda p: p.is_file() and uploaded.append(p.relative_to(tmp_path).as_posix()), include_gitignore=True)
    assert sorted(uploaded) == sorted(kept + [".gitignore"])

    with pytest.raises(SystemExit):
        main(["submit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "runtime_env, which anyone who can open the Ray dashboard can read" in help_text
    assert "*.pem" in help_text and ".env" in help_text
