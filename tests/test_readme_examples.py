"""The README's commands, run as a user pastes them, so the README cannot drift from the code.

Every ```bash block of README.md is split into commands (lines joined where they end in ``\\``, ``|`` or ``&&``;
an ``&&`` chain is split into its parts) and every ```python block is one example. Each is either run here
(``RUN``) or skipped with its reason (``SKIPPED``: long-running commands such as the quickstart or a search, and
those that need a cluster, each covered by its own test); one that is neither fails the quick test below, so a
new README command must be placed in one table or the other. ``pytest -rs`` lists the skipped ones and why.

What the commands find:

* a temporary folder as the working directory, holding ``chest.png`` (a real chest radiograph,
  ``../shared/data/cxr_samples/00000001_000.png``, 182 KB: its base64 is larger than the 128 KiB one command-line
  argument may hold, so an example that passes the image as an argument fails here as it did for users),
  ``reports.csv`` (a ``report`` column) and ``jobs/`` (a link to the repository's specs);
* ``medvl`` on ``PATH``: this interpreter running this checkout's ``medvl.cli``;
* ``SPEC`` replaced by the quickstart's spec with its ``output_dir`` in the temporary folder, where its train stage
  has "written" a tiny random-weight BLIP of the quickstart's architecture (no training: only serving is tested);
* for the request examples, one Ray Serve instance (its start costs about a minute, paid once) holding that model
  without an API key and a tiny BLIP VQA model behind ``$MEDVL_API_KEY`` (the README's VQA example sends it). One
  Serve instance holds both under their own route prefixes, so ``localhost:8000/v1/<endpoint>`` becomes
  ``localhost:<free port>/<the model's prefix>/v1/<endpoint>``; nothing else in a command is changed.

A request example passes when it exits 0 (bash runs with ``pipefail``), gets HTTP 200 (curl reports the status
through a ``.curlrc`` of the test's own), answers JSON with the keys its ``# {…}`` comment line in the README shows,
and names no path of the server's disk.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CHEST = REPO.parent / "shared" / "data" / "cxr_samples" / "00000001_000.png"
MAX_ARG_STRLEN = 131_072  # Linux: the most bytes one argument of exec may hold (32 pages of 4 KiB)
README_PORT = "localhost:8000"
KEY = "medvl-" + secrets.token_hex(12)
SERVER_KEY_ENV = "MEDVL_README_TEST_KEY"  # the served VQA model's key; the commands get it as $MEDVL_API_KEY
COMMAND_TIMEOUT_S = 120
TEXTS = ["no acute cardiopulmonary process", "small left pleural effusion", "the heart is enlarged",
         "is there an effusion?", "yes", "no", "nodule in the right upper zone", "where is the nodule?"] * 4

# A pattern (re.search on the command, whitespace collapsed) → why the test does not run it.
SKIPPED = {
    r"^bash \.ci/setup$": "builds .venv from scratch: CI's .ci/run does exactly this before the tests",
    r"\bpython -m pytest$": "the whole test suite: CI runs it (.ci/run)",
    r"^(\.venv/bin/)?medvl run jobs/quickstart\.yaml\b": "the quickstart trains for minutes: "
    "benchmarks/quickstart_time.py runs it end to end; tests/test_train.py and tests/test_submit.py run its stages "
    "cut small",
    r"^medvl prepare\|train\|tune\|eval SPEC$": "a synopsis of four commands, not one to paste",
    r"^medvl serve (SPEC|jobs/\S+)( --set \S+)?$": "serves until Ctrl+C: tests/test_serve.py runs `medvl serve` "
    "to SIGTERM; this test serves the same app to the request examples",
    r"^serve deploy ": "needs a running Ray cluster to deploy to; the file it reads, written by the `--write-config` "
    "command run here, is checked against Ray's schema",
    r"^medvl tune ": "a search (36 trials on BLIP-2 OPT-2.7B): tests/test_tune.py runs ASHA on tiny models",
    r"^medvl eval SPEC\b": "scores a trained model on a test split: tests/test_train.py runs `medvl eval`",
    r"^(ray|kubectl) ": "needs AWS or Kubernetes: tests/test_cluster_configs.py checks the configs it names",
    r"^export RAY_API_SERVER_ADDRESS=": "sets the address of a cluster for the commands after it",
    r"^medvl (submit|status|logs|stop) ": "needs a Ray cluster: tests/test_submit.py submits to a real head on "
    "loopback",
    r"^mlflow ui ": "starts MLflow's web UI until Ctrl+C: tests/test_tracking.py reads the same store with "
    "mlflow.search_runs",
    r"^medvl compare runs/": "compares finished runs: tests/test_tracking.py compares the ablation job's tiny run "
    "and synthetic run folders",
}
# Patterns of the commands that run; those holding README_PORT are requests to the served models.
RUN = [r"^medvl validate ", r"^medvl chexpert ", r"^medvl serve SPEC --write-config ", re.escape(README_PORT)]


@dataclass(frozen=True)
class Example:
    section: str  # the README's "## " heading above it
    language: str  # bash or python
    text: str  # one bash command (its lines joined), or a python block as written
    shows: str = ""  # the "# {…}" comment line after it in the README: the answer's keys

    @property
    def words(self) -> str:
        """The text with its whitespace collapsed: what the RUN and SKIPPED patterns match."""
        return " ".join(self.text.split())

    @property
    def needs_server(self) -> bool:
        return README_PORT in self.text


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a blank)."""
    quote, escaped = "", False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_commands(section: str, lines: list[str]) -> list[Example]:
    commands: list[Example] = []
    pending: list[str] = []
    for line in lines:
        code = strip_comment(line)
        if not pending and not code:
            if line.strip().startswith("# {") and commands:  # the answer the command above gets
                commands[-1] = Example(section, "bash", commands[-1].text, line.strip())
            continue
        pending.append(code.removesuffix("\\").strip())
        if code.endswith(("\\", "|", "&&")):
            continue
        commands += [Example(section, "bash", part) for part in re.split(r"\s+&&\s+", " ".join(pending))]
        pending = []
    return commands


def readme_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    section, language, block = "", "", None
    for line in text.splitlines():
        if block is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                language, block = line[3:].strip(), []
        elif line.startswith("```"):
            if language in ("bash", "sh", "shell"):
                examples += bash_commands(section, block)
            elif language == "python":
                examples.append(Example(section, "python", "\n".join(block)))
            block = None
        else:
            block.append(line)
    return examples


def skip_reason(example: Example) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, example.words)), None)


def runs(example: Example) -> bool:
    return any(re.search(pattern, example.words) for pattern in RUN)


EXAMPLES = readme_examples(README.read_text())


# --------------------------------------------------------------------------------------- quick: no Ray


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    assert len(EXAMPLES) >= 10 and sum(e.needs_server for e in EXAMPLES) >= 4  # the parser found the blocks
    unplaced = [e.text for e in EXAMPLES if runs(e) == (skip_reason(e) is not None)]
    assert not unplaced, ("each README command must match exactly one of RUN (run by this test) and SKIPPED (with "
                          f"the reason): {unplaced}")
    stale = [pattern for pattern in SKIPPED if not any(re.search(pattern, e.words) for e in EXAMPLES)]
    assert not stale, f"SKIPPED patterns that match no README command any more: {stale}"


def test_the_parser_splits_commands_and_reads_the_answer_they_show():
    text = ("## A\n```bash\nmedvl x a   # why\n\n{ printf 'a # b'; } |\n  curl -s y \\\n     -d @-\n"
            "# {\"text\": \"...\"}\nbash s && medvl y\n```\n```yaml\nk: v\n```\n## B\n```python\nprint(1)\n```\n")
    assert readme_examples(text) == [
        Example("A", "bash", "medvl x a"),
        Example("A", "bash", "{ printf 'a # b'; } | curl -s y -d @-", '# {"text": "..."}'),
        Example("A", "bash", "bash s"), Example("A", "bash", "medvl y"),
        Example("B", "python", "print(1)"),
    ]


def chest_image() -> Path:
    if not CHEST.is_file():
        pytest.skip(f"the real chest radiograph is not here ({CHEST}: CI has ../shared beside the clone)")
    return CHEST


def test_the_chest_image_is_too_large_to_pass_as_one_argument(tmp_path: Path):
    """Why the request examples pipe the body: the form they replaced fails before it reaches the server."""
    image = chest_image()
    assert len(base64.b64encode(image.read_bytes())) > MAX_ARG_STRLEN
    if not sys.platform.startswith("linux") or not shutil.which("curl"):
        pytest.skip("needs Linux (MAX_ARG_STRLEN is its limit) and curl (the example that failed used it)")
    shutil.copy(image, tmp_path / "chest.png")
    old_example = 'curl -s localhost:1/v1/caption -d "{\\"image\\": \\"$(base64 -w0 chest.png)\\"}"'
    result = subprocess.run(["bash", "-c", old_example], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Argument list too long" in result.stderr, result.stderr


# --------------------------------------------------------------------------------------- running them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Workdir:
    path: Path
    spec: Path  # what SPEC stands for: the quickstart, its train stage's model written
    env: dict[str, str]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Workdir:
    from transformers import BlipForConditionalGeneration

    from medvl.models.blip_caption import save_tiny_blip

    path = tmp_path_factory.mktemp("readme")
    if CHEST.is_file():
        shutil.copy(CHEST, path / "chest.png")
    (path / "jobs").symlink_to(REPO / "jobs")
    (path / "reports.csv").write_text('report\n"Small left pleural effusion. No pneumothorax."\n'
                                      '"The heart is enlarged. No focal consolidation."\n')
    quickstart = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    run = path / "runs" / "quickstart"
    train = run / "train"
    train.mkdir(parents=True)
    image_size = quickstart["data"]["image_size"]
    shutil.move(save_tiny_blip(BlipForConditionalGeneration, path / "build", TEXTS, image_size), train / "model")
    (train / "train_summary.json").write_text(json.dumps({"model_dir": str(train / "model")}))
    spec = path / "quickstart.yaml"
    spec.write_text(yaml.safe_dump({**quickstart, "output_dir": str(run),
                                    "serve": {"num_cpus": 0, "max_new_tokens": 8}}))
    bin_dir = path / "bin"  # `medvl` as the README calls it: this interpreter, this checkout
    bin_dir.mkdir()
    (bin_dir / "medvl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m medvl.cli "$@"\n')
    (bin_dir / "medvl").chmod(0o755)
    (path / ".curlrc").write_text('write-out = "\\n%{http_code}\\n"\n')  # the status on stdout's last line
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CURL_HOME": str(path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MEDVL_API_KEY": KEY, "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
    env.pop("RAY_ADDRESS", None)
    return Workdir(path, spec, env)


def vqa_spec(workdir: Workdir) -> Path:
    """A tiny BLIP VQA model behind the API key (the README's VQA example sends one)."""
    from transformers import BlipForQuestionAnswering

    from medvl.models.blip_caption import save_tiny_blip

    model = save_tiny_blip(BlipForQuestionAnswering, workdir.path / "vqa", TEXTS, 32)
    spec = workdir.path / "vqa.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "readme-vqa", "output_dir": str(workdir.path / "runs" / "vqa"), "stages": ["serve"],
        "data": {"task": "vqa", "image_size": 32, "max_text_length": 16, "max_question_length": 12},
        "model": {"recipe": "blip_vqa", "name_or_path": model},
        "eval": {"num_beams": 1, "max_new_tokens": 5},
        "serve": {"checkpoint": model, "num_cpus": 0, "api_key_env": SERVER_KEY_ENV},
    }))
    return spec


# The README's endpoint → the route prefix of the model that answers it (the quickstart's model by default).
PREFIXES = {"/v1/vqa": "/vqa"}
DEFAULT_PREFIX = "/quickstart"


@pytest.fixture(scope="module")
def served(workdir: Workdir, request) -> int:
    """One Serve instance with both models on a free loopback port; yields the port."""
    chest_image()  # skips before Ray starts when the image is not here
    request.getfixturevalue("ray_local")
    from ray import serve

    from medvl.serve.auth import api_key_digest
    from medvl.serve.checkpoint import resolve_checkpoint
    from medvl.serve.command import application
    from medvl.spec import load_spec

    os.environ[SERVER_KEY_ENV] = KEY
    try:
        targets = []
        for path, prefix, last_train in [(workdir.spec, DEFAULT_PREFIX, "train"), (vqa_spec(workdir), "/vqa", None)]:
            spec = load_spec(path)
            app = application(spec, resolve_checkpoint(spec, last_train), api_key_digest(spec.serve))
            targets.append(serve.RunTarget(app, name=prefix.strip("/"), route_prefix=prefix))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run_many(targets)
            yield port
        finally:
            serve.shutdown()
    finally:
        os.environ.pop(SERVER_KEY_ENV, None)


def aimed_at(text: str, port: int) -> str:
    def local(match: re.Match) -> str:
        path = match.group(1)
        prefix = next((p for endpoint, p in PREFIXES.items() if path.startswith(endpoint)), DEFAULT_PREFIX)
        return f"localhost:{port}{prefix}{path}"

    return re.sub(re.escape(README_PORT) + r"(/\S*)", local, text)


def keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys(v)}
    return set()


def run_example(example: Example, workdir: Workdir, port: int | None) -> subprocess.CompletedProcess:
    text = re.sub(r"\bSPEC\b", str(workdir.spec), example.text)
    if port is not None:
        text = aimed_at(text, port)
    command = ["bash", "-o", "pipefail", "-c", text] if example.language == "bash" else [sys.executable, "-c", text]
    return subprocess.run(command, cwd=workdir.path, env=workdir.env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def check_request(example: Example, result: subprocess.CompletedProcess, workdir: Workdir) -> None:
    assert str(workdir.path) not in result.stdout, f"the answer names a path on the server: {result.stdout}"
    if example.language == "python":  # the example exits non-zero on a refusal
        assert result.stdout.strip(), result.stderr
        return
    body, _, status = result.stdout.rstrip("\n").rpartition("\n")
    answer = json.loads(body)
    assert status == "200", f"HTTP {status}: {body}"
    assert "error" not in answer
    shown = set(re.findall(r'"(\w+)":', example.shows))
    assert shown <= keys(answer), f"the README shows keys {sorted(shown - keys(answer))} the answer lacks: {body}"


def check_files(text: str, workdir: Workdir) -> None:
    """The files a command says it writes exist, and a written Serve config passes Ray's own schema."""
    for option, name in re.findall(r"--(out|write-config) (\S+)", text):
        written = workdir.path / name
        assert written.is_file() and written.stat().st_size > 0, f"{text}: no {name}"
        if option == "write-config":
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(yaml.safe_load(written.read_text()))


def example_id(number: int, example: Example) -> str:
    """Position, section, then the endpoint a request goes to or the command's first words: ``16-serving-v1-vqa``."""
    path = re.search(re.escape(README_PORT) + r"(/[\w/]+)", example.text)
    words = [path.group(1)] if path else [w for w in example.words.split() if w[0].isalnum() or w[0] == "."][:2]
    return re.sub(r"[^\w.]+", "-", " ".join([f"{number:02d}", example.section.lower() or "top", *words])).strip("-")


def example_params() -> list:
    """One test per command, skipped with its reason or marked slow where it needs the served models."""
    params = []
    for number, example in enumerate(EXAMPLES, 1):
        reason = skip_reason(example)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if example.needs_server:
            marks.append(pytest.mark.slow)  # starts Ray Serve
        params.append(pytest.param(example, marks=marks, id=example_id(number, example)))
    return params


@pytest.mark.parametrize("example", example_params())
def test_readme_command_works(example: Example, workdir: Workdir, request):
    if not runs(example):
        pytest.fail(f"README command in neither RUN nor SKIPPED: {example.text}")
    if "curl" in example.words.split() and not shutil.which("curl"):
        pytest.skip("curl is not installed here, and the README's request examples use it")
    port = request.getfixturevalue("served") if example.needs_server else None
    result = run_example(example, workdir, port)
    assert "Argument list too long" not in result.stderr, result.stderr
    assert result.returncode == 0, f"{example.text}\nexit {result.returncode}\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    if example.needs_server:
        check_request(example, result, workdir)
    else:
        check_files(example.text, workdir)
