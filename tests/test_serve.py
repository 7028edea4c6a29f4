"""Serving: request validation, the Serve config file and which checkpoint is served (no Ray); then `medvl serve`
of a train stage's LoRA adapter answering /v1/report and exiting 0 on SIGTERM, and one live Serve instance on
loopback with two tiny models (caption, VQA) for the other endpoints, every bad input, the API key and the replica
surviving them."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medvl.cli import main
from medvl.serve.auth import authorized
from medvl.serve.checkpoint import model_location, resolve_checkpoint
from medvl.serve.requests import RequestError, parse_json
from medvl.spec import ServeSpec, SpecError, parse_spec

SIZE = 32  # BLIP patch 16: a 2×2 grid of patches
TEXTS = ["no acute finding", "small left pleural effusion", "cardiomegaly", "is there an effusion?", "yes", "no",
         "right upper zone nodule", "where is the nodule?"] * 4
KEY_ENV = "MEDVL_TEST_SERVE_KEY"
KEY = "medvl-" + secrets.token_hex(12)
LIMITS = {"max_image_bytes": 50_000, "max_image_pixels": 100_000}


def png(width: int = SIZE, height: int = SIZE, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def job(recipe: str, model_dir: str, out: Path, **serve) -> dict:
    return {
        "name": f"serve-{recipe.replace('_', '-')}",
        "output_dir": str(out),
        "stages": ["serve"],
        "data": {"task": "vqa" if recipe == "blip_vqa" else "caption", "image_size": SIZE, "max_text_length": 16,
                 "max_question_length": 12},
        "model": {"recipe": recipe, "preset": "", "name_or_path": model_dir},
        "train": {"finetune": "lora" if recipe == "blip2" else "full"},
        "eval": {"num_beams": 1, "max_new_tokens": 5},
        "serve": {"checkpoint": model_dir, "num_cpus": 0, "max_batch_size": 4, "batch_wait_timeout_s": 0.005,
                  **LIMITS, **serve},
    }


# --------------------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize("body, takes_question, status, code", [
    (b"{not json", False, 400, "invalid_json"),
    (b"[1, 2]", False, 400, "invalid_json"),
    (b"{}", False, 400, "missing_field"),
    (json.dumps({"image": 123}).encode(), False, 400, "wrong_type"),
    (json.dumps({"image": "%%% not base64 %%%"}).encode(), False, 400, "invalid_base64"),
    (json.dumps({"image": b64(b"hello, not an image")}).encode(), False, 400, "not_an_image"),
    (json.dumps({"image": b64(secrets.token_bytes(60_000))}).encode(), False, 413, "image_too_large"),
    (json.dumps({"image": b64(png(400, 400))}).encode(), False, 413, "image_too_large"),  # 160k pixels
    (json.dumps({"image": b64(png()), "question": "why?"}).encode(), False, 400, "question_not_supported"),
    (json.dumps({"image": b64(png()), "attention": "yes"}).encode(), False, 400, "wrong_type"),
    (json.dumps({"image": b64(png()), "img": 1}).encode(), False, 400, "unknown_field"),
    (json.dumps({"image": b64(png())}).encode(), True, 400, "missing_field"),
    (json.dumps({"image": b64(png()), "question": 7}).encode(), True, 400, "wrong_type"),
    (json.dumps({"image": b64(png()), "question": "  "}).encode(), True, 400, "empty_question"),
    (b"[" * 100_000 + b"]" * 100_000, False, 400, "invalid_json"),
    (b'{"image": "%s", "question": "\\ud800?"}' % b64(png()).encode(), True, 400, "invalid_text"),
    (b'{"image": "%s", "question": "\xed\xa0\x80?"}' % b64(png()).encode(), True, 400, "invalid_text"),
], ids=["invalid-json", "not-an-object", "no-image", "image-not-string", "not-base64", "not-an-image", "too-many-bytes",
        "too-many-pixels", "question-to-caption-model", "attention-not-bool", "unknown-field", "vqa-without-question",
        "question-not-string", "blank-question", "nested-too-deep", "lone-surrogate-escape", "lone-surrogate-bytes"])
def test_bad_request_bodies_are_refused_with_a_code(body: bytes, takes_question: bool, status: int, code: str):
    with pytest.raises(RequestError) as info:
        parse_json(body, ServeSpec(**LIMITS), takes_question)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    assert info.value.body()["error"]["message"]


def test_every_refusal_encodes_as_json_utf8():
    """A refusal that echoes what was sent must still serialise (a lone surrogate in a key would fail as a 500)."""
    from medvl.serve.app import refused

    with pytest.raises(RequestError) as info:
        parse_json(b'{"image": "x", "\\udc80": 1}', ServeSpec(**LIMITS), False)
    assert info.value.code == "unknown_field"
    import asyncio

    response = asyncio.run(refused(None, info.value))
    assert response.status_code == 400 and json.loads(response.body)["error"]["field"] == "\\udc80"


def other_format(format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    other_format("BMP"), other_format("GIF"), other_format("TIFF"),
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n",
], ids=["bmp", "gif", "tiff", "eps"])
def test_only_png_jpeg_and_dicom_are_opened(data: bytes):
    from medvl.serve.requests import check_image

    with pytest.raises(RequestError) as info:
        check_image(data, ServeSpec(**LIMITS))
    assert (info.value.status, info.value.code) == (400, "not_an_image")


def test_a_multiframe_dicom_counts_every_frame_against_the_pixel_limit():
    import numpy as np
    from test_readers import dicom_bytes

    from medvl.serve.requests import check_image

    settings = ServeSpec(max_image_bytes=1_000_000, max_image_pixels=100_000)
    one = dicom_bytes(np.zeros((200, 200), dtype=np.uint16))
    check_image(one, settings)  # 40,000 pixels
    frames = dicom_bytes(np.zeros((3, 200, 200), dtype=np.uint8))  # 120,000 pixels in 120 kB
    with pytest.raises(RequestError, match=r"3 frame\(s\) × 1 sample\(s\) × 200×200") as info:
        check_image(frames, settings)
    assert (info.value.status, info.value.code) == (413, "image_too_large")


def streamed_request(body: bytes, content_type: str, chunk: int = 16 * 1024):
    """A Starlette request without Content-Length (a chunked upload), counting the chunks the server reads."""
    from starlette.requests import Request

    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    read = []

    async def receive() -> dict:
        read.append(chunks[len(read)])
        return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/caption", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())]}
    return Request(scope, receive), read, len(chunks)


@pytest.mark.parametrize("form", [True, False], ids=["multipart", "json"])
def test_a_body_without_content_length_is_cut_off_at_the_limit(form: bool):
    import asyncio

    from medvl.serve.requests import max_body_bytes, read_query

    settings = ServeSpec(**LIMITS)
    image = secrets.token_bytes(1_000_000)
    if form:
        boundary = "medvl-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        request, read, total = streamed_request(body, f"multipart/form-data; boundary={boundary}")
    else:
        request, read, total = streamed_request(json.dumps({"image": b64(image)}).encode(), "application/json")
    with pytest.raises(RequestError) as info:
        asyncio.run(read_query(request, settings, takes_question=False))
    assert (info.value.status, info.value.code) == (413, "body_too_large")
    assert sum(map(len, read)) <= max_body_bytes(settings) + 16 * 1024 < total * 16 * 1024 // 4


def test_good_request_bodies_parse():
    settings = ServeSpec(**LIMITS)
    image = png()
    query = parse_json(json.dumps({"image": "data:image/png;base64," + b64(image), "attention": True}).encode(),
                       settings, takes_question=False)
    assert query.image == image and query.attention and query.question == ""
    query = parse_json(json.dumps({"image": b64(image), "question": "is there an effusion?"}).encode(), settings,
                       takes_question=True)
    assert query.question == "is there an effusion?" and not query.attention


def fake_model_folder(path: Path, marker: str = "config.json") -> Path:
    path.mkdir(parents=True)
    (path / marker).write_text("{}")
    return path


def test_checkpoint_comes_from_the_last_train_stage_or_serve_checkpoint(tmp_path: Path):
    raw = job("blip_caption", "org/model", tmp_path / "run", checkpoint="")
    raw["stages"] = ["train", "serve"]
    spec = parse_spec(raw)
    with pytest.raises(SpecError, match=r"^serve\.checkpoint: .*stage 'train' has not written a model yet"):
        resolve_checkpoint(spec, "train")
    model = fake_model_folder(tmp_path / "run" / "train" / "model")
    (tmp_path / "run" / "train" / "train_summary.json").write_text(json.dumps({"model_dir": str(model)}))
    assert resolve_checkpoint(spec, "train") == str(model)

    adapter = fake_model_folder(tmp_path / "adapter", "adapter_config.json")
    assert model_location(str(adapter)) == str(adapter)
    best = fake_model_folder(tmp_path / "tune" / "best" / "model", "adapter_config.json")
    assert model_location(str(tmp_path / "tune")) == str(best)  # a tune stage's folder before its summary
    assert model_location(str(tmp_path / "tune" / "best")) == str(best)
    with pytest.raises(SpecError, match=r"^serve\.checkpoint: .*no such folder"):
        model_location(str(tmp_path / "missing"))
    with pytest.raises(SpecError, match=r"^serve\.checkpoint: expected a model folder \(the spec has no train"):
        resolve_checkpoint(parse_spec(job("blip_caption", "org/model", tmp_path, checkpoint="")), None)


def test_a_missing_local_checkpoint_fails_naming_it_instead_of_becoming_a_hub_download(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SpecError, match=r"^serve\.checkpoint: expected a model folder, got 'runs/model' \(no such"):
        model_location("runs/model")  # shaped like org/name, but runs/ is a folder here: a mistyped path
    assert model_location("Salesforce/blip-vqa-base") == "Salesforce/blip-vqa-base"  # no Salesforce/ here
    assert model_location("hf://runs/model") == "runs/model"  # said explicitly
    with pytest.raises(SpecError, match=r"^serve\.checkpoint: expected hf://<org>/<name>"):
        model_location("hf://../etc")


def test_model_is_named_without_server_paths(tmp_path: Path):
    from medvl.serve.app import model_identity, public_model_name

    out = tmp_path / "runs" / "quickstart"
    stage_model = fake_model_folder(out / "train" / "model")
    assert public_model_name(str(stage_model), str(out)) == "train"
    assert public_model_name(str(fake_model_folder(out / "tune" / "best" / "model")), str(out)) == "tune/best"
    elsewhere = fake_model_folder(tmp_path / "shelf" / "cxr-blip")
    assert public_model_name(str(elsewhere), str(out)) == "cxr-blip"
    assert public_model_name(str(fake_model_folder(tmp_path / "v2" / "model")), str(out)) == "v2"
    assert public_model_name("Salesforce/blip-image-captioning-base", str(out)) == (
        "Salesforce/blip-image-captioning-base")

    spec = parse_spec(job("blip_caption", "Salesforce/blip-image-captioning-base", out))
    assert model_identity(spec, str(stage_model)) == {"model": "train", "recipe": "blip_caption",
                                                      "base_model": "Salesforce/blip-image-captioning-base",
                                                      "preset": ""}
    adapter = fake_model_folder(out / "stage2" / "model", "adapter_config.json")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(elsewhere)}))
    identity = model_identity(parse_spec(job("blip2", "org/unused", out)), str(adapter))
    assert (identity["model"], identity["base_model"]) == ("stage2", "cxr-blip")  # the base the adapter records
    tiny = parse_spec({**job("blip_caption", "org/unused", out), "model": {"recipe": "blip_caption", "preset": "tiny"}})
    assert model_identity(tiny, str(stage_model))["base_model"] is None  # random weights: no base model
    assert str(tmp_path) not in json.dumps([identity, model_identity(spec, str(stage_model))])


def test_write_config_is_a_valid_serve_config_without_the_key(tmp_path: Path, monkeypatch, capsys):
    from ray.serve.schema import ServeDeploySchema

    model = fake_model_folder(tmp_path / "model")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job("blip_caption", str(model), tmp_path / "run", api_key_env=KEY_ENV,
                                            autoscaling_min_replicas=1, autoscaling_max_replicas=3, num_cpus=2)))
    out = tmp_path / "serve.yaml"
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["serve", str(spec_path), "--write-config", str(out)]) == 2  # no key in the environment
    assert f"serve.api_key_env: expected the environment variable {KEY_ENV}" in capsys.readouterr().err

    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["serve", str(spec_path), "--write-config", str(out), "--set", "serve.port=8123"]) == 0
    text = out.read_text()
    assert KEY not in text
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = config["applications"]
    assert app["import_path"] == "medvl.serve.app:build_app" and app["route_prefix"] == "/"
    assert app["args"]["checkpoint"] == str(model)
    assert hashlib.sha256(KEY.encode()).hexdigest() not in text  # no unsalted digest to look up either
    digest = app["args"]["api_key_hmac"]
    assert digest.startswith("hmac-sha256:") and authorized({"x-api-key": KEY}, digest)
    assert not authorized({"x-api-key": KEY + "x"}, digest) and not authorized({}, digest)
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert "num_replicas" not in deployment  # Serve refuses both
    assert deployment["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert deployment["max_ongoing_requests"] == 8  # room for two full batches of 4
    assert parse_spec(app["args"]["spec"]).serve.port == 8123  # what the replica rebuilds


def test_the_key_digest_is_salted_and_an_old_unsalted_config_is_refused(tmp_path: Path, monkeypatch, capsys):
    from medvl.serve.app import build_app
    from medvl.serve.auth import api_key_digest
    from medvl.serve.config import app_args

    monkeypatch.setenv(KEY_ENV, KEY)
    settings = ServeSpec(api_key_env=KEY_ENV)
    first, second = api_key_digest(settings), api_key_digest(settings)
    assert first != second and KEY not in first  # a fresh salt each time: equal keys do not look equal
    assert authorized({"authorization": f"Bearer {KEY}"}, first) and authorized({"authorization": f"Bearer {KEY}"},
                                                                                 second)
    spec = parse_spec(job("blip_caption", "org/model", tmp_path, api_key_env=KEY_ENV))
    old = {**app_args(spec, "org/model", ""), "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    with pytest.raises(ValueError, match="--write-config"):
        build_app(old)  # would otherwise serve without a key
    assert "salted HMAC-SHA256" in main_help(["serve", "--help"], capsys)


def main_help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return " ".join(capsys.readouterr().out.split())


def test_serve_without_a_trained_model_fails_before_ray(tmp_path: Path, capsys):
    raw = job("blip_caption", "org/model", tmp_path / "run", checkpoint="")
    raw["stages"] = ["train"]
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["serve", str(spec_path), "--write-config", str(tmp_path / "x.yaml")]) == 2
    assert "serve.checkpoint: expected a model folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- live Serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random-init models as the recipes build them: BLIP caption, BLIP VQA, a BLIP-2 LoRA adapter."""
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    from medvl.models.blip2 import save_tiny_blip2
    from medvl.models.blip_caption import save_tiny_blip
    from medvl.models.registry import build_recipe

    root = tmp_path_factory.mktemp("serve-models")
    caption = save_tiny_blip(BlipForConditionalGeneration, root / "caption", TEXTS, SIZE)
    vqa = save_tiny_blip(BlipForQuestionAnswering, root / "vqa", TEXTS, SIZE)
    base = save_tiny_blip2(root / "blip2", TEXTS, SIZE)
    recipe = build_recipe(parse_spec(job("blip2", base, root)))
    adapter = root / "blip2-adapter"
    recipe.save(recipe.load_for_training(base), base, adapter)
    return {"blip_caption": caption, "blip_vqa": vqa, "blip2": str(adapter)}


def runner_for(recipe: str, models: dict[str, str], tmp_path: Path):
    from medvl.serve.runner import ModelRunner

    return ModelRunner(parse_spec(job(recipe, models[recipe], tmp_path)), models[recipe])


def test_a_query_that_fails_alone_fails_only_itself_and_the_model_stays_healthy(models, tmp_path: Path):
    from medvl.serve.requests import Query

    runner = runner_for("blip_vqa", models, tmp_path)
    # Validation refuses this question; here it reaches the model anyway (as an unforeseen bad input would):
    # the tokenizer raises for the whole batch.
    queries = [Query(png(), "is there an effusion?"), Query(png(), "\ud800?"), Query(png(), "where is the nodule?")]
    first, bad, last = runner.answer(queries)
    assert isinstance(first, dict) and isinstance(last, dict), (first, last)
    assert isinstance(bad, RequestError) and (bad.status, bad.code) == (500, "generation_failed")
    assert runner.suspect
    runner.check_health()  # the probe (a blank image) generates: the failure was the query's
    assert not runner.suspect and not runner.dead_reason


def test_a_dead_model_fails_its_health_check_for_good(models, tmp_path: Path, monkeypatch):
    from medvl.serve.requests import Query
    from medvl.serve.runner import ModelDead

    runner = runner_for("blip_caption", models, tmp_path)
    runner.check_health()  # healthy, and not even probed
    assert isinstance(runner.answer([Query(png())])[0], dict)

    def device_lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.recipe, "generate_scored", device_lost)
    answers = runner.answer([Query(png()), Query(png(colour=(0, 0, 0)))])
    assert [(a.status, a.code) for a in answers] == [(500, "generation_failed")] * 2
    with pytest.raises(ModelDead, match="failed a generation from a blank image"):
        runner.check_health()
    monkeypatch.undo()  # even if it came back, a replica that lost its model once is replaced
    with pytest.raises(ModelDead):
        runner.check_health()


def test_a_calibration_temperature_beside_the_model_scales_its_confidence_not_its_text(models, tmp_path: Path):
    import shutil

    from medvl.serve.requests import Query
    from medvl.serve.runner import ModelRunner

    calibrated = tmp_path / "calibrated"
    shutil.copytree(models["blip_caption"], calibrated)
    (calibrated / "calibration.json").write_text(json.dumps({"temperature": 0.5}))
    plain = runner_for("blip_caption", models, tmp_path)
    sharper = ModelRunner(parse_spec(job("blip_caption", str(calibrated), tmp_path)), str(calibrated))
    assert (plain.temperature, sharper.temperature) == (1.0, 0.5)
    (before,), (after,) = plain.answer([Query(png())]), sharper.answer([Query(png())])
    assert after["text"] == before["text"]
    assert after["mean_token_prob"] != pytest.approx(before["mean_token_prob"])


def test_serve_dtype_loads_the_replicas_weights_in_it_and_a_bad_one_is_refused(models, tmp_path: Path):
    import torch

    from medvl.serve.requests import Query
    from medvl.serve.runner import ModelRunner

    raw = job("blip_caption", models["blip_caption"], tmp_path, dtype="bfloat16")
    runner = ModelRunner(parse_spec(raw), models["blip_caption"])
    assert next(runner.loaded.module.parameters()).dtype == torch.bfloat16
    assert runner_for("blip_caption", models, tmp_path).loaded.module.dtype == torch.float32  # "" = model.dtype
    assert isinstance(runner.answer([Query(png())])[0]["text"], str)
    with pytest.raises(SpecError, match=r"^serve\.dtype: expected one of"):
        parse_spec(job("blip_caption", models["blip_caption"], tmp_path, dtype="fp8"))


@pytest.mark.slow
def test_medvl_serve_answers_then_exits_0_on_sigterm(models, tmp_path: Path):
    """The model is the train stage's (its train_summary.json names the adapter), served on its base."""
    port = free_port()
    raw = job("blip2", "org/base", tmp_path / "run", port=port, num_cpus=0.5, checkpoint="")
    raw["stages"] = ["train"]
    (tmp_path / "run" / "train").mkdir(parents=True)
    (tmp_path / "run" / "train" / "train_summary.json").write_text(json.dumps({"model_dir": models["blip2"]}))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"  # a file, not a pipe: nobody reads a pipe while the server runs
    process = subprocess.Popen([sys.executable, "-m", "medvl.cli", "serve", str(spec_path), "--set", "ray.num_cpus=1"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    import requests

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy still starting
                pass
            time.sleep(1)
        answer = requests.post(f"{url}/v1/report", json={"image": b64(png())}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["text"], str) and 0 < answer.json()["mean_token_prob"] <= 1
        info = requests.get(f"{url}/v1/model", timeout=60)
        assert (info.json()["recipe"], info.json()["endpoint"]) == ("blip2", "/v1/report")
        assert (info.json()["model"], info.json()["base_model"]) == ("blip2-adapter", "tiny-init")  # folder names
        assert str(Path(models["blip2"]).parent) not in info.text
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM, shutting down" in output
    with pytest.raises(requests.ConnectionError):  # Serve's proxy went with it
        requests.get(f"{url}/healthz", timeout=2)


@dataclass
class Live:
    url: str  # the Serve proxy; each model's app lives under /<recipe>
    replicas: dict[str, str]  # recipe → replica id when the apps came up

    def post(self, recipe: str, endpoint: str, key: str | None = KEY, **kwargs):
        import requests

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.post(f"{self.url}/{recipe}/v1/{endpoint}", headers=headers, timeout=60, **kwargs)

    def get(self, recipe: str, path: str, key: str | None = KEY):
        import requests

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(f"{self.url}/{recipe}{path}", headers=headers, timeout=60)

    def replica(self, recipe: str) -> str:
        response = self.get(recipe, "/healthz", key=None)
        assert response.status_code == 200, response.text
        return response.json()["replica"]


LIVE = ("blip_caption", "blip_vqa")


@pytest.fixture(scope="module")
def live(ray_local, models, tmp_path_factory):
    """One Serve instance, an application per model under /<recipe>; the caption model asks for the API key."""
    from ray import serve

    from medvl.serve.auth import api_key_digest
    from medvl.serve.command import application

    os.environ[KEY_ENV] = KEY
    out = tmp_path_factory.mktemp("serve-run")
    targets = []
    for recipe in LIVE:
        model_dir = models[recipe]
        # The caption model asks for the key, and waits long enough for concurrent requests to share a batch.
        extra = {"api_key_env": KEY_ENV, "batch_wait_timeout_s": 0.25} if recipe == "blip_caption" else {}
        spec = parse_spec(job(recipe, model_dir, out, **extra))
        app = application(spec, resolve_checkpoint(spec, None), api_key_digest(spec.serve))
        targets.append(serve.RunTarget(app, name=recipe, route_prefix=f"/{recipe}"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run_many(targets)
        server = Live(f"http://127.0.0.1:{port}", {})
        server.replicas = {recipe: server.replica(recipe) for recipe in LIVE}
        yield server
    finally:
        serve.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, endpoint, fields", [
    ("blip_caption", "caption", {}),
    ("blip_vqa", "vqa", {"question": "is there an effusion?"}),
])
def test_each_endpoint_answers_with_text_probability_and_latency(live, models, recipe, endpoint, fields):
    response = live.post(recipe, endpoint, json={"image": b64(png()), **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["text"], str)
    assert 0.0 < body["mean_token_prob"] <= 1.0
    assert body["latency_ms"] > 0 and body["batch_size"] >= 1
    answer = live.get(recipe, "/v1/model")
    info = answer.json()
    assert info["recipe"] == recipe and info["endpoint"] == f"/v1/{endpoint}"
    assert info["model"] == info["base_model"] == "tiny-init"  # the folder's name (job() names it as the base too)
    assert str(Path(models[recipe]).parent) not in answer.text  # no server path
    assert info["takes_question"] == (endpoint == "vqa")
    assert info["api_key_required"] == (recipe == "blip_caption")


@pytest.mark.slow
def test_multipart_upload_answers_like_json(live):
    image = png(colour=(10, 200, 10))
    upload = live.post("blip_vqa", "vqa", files={"image": ("chest.png", image, "image/png")},
                       data={"question": "where is the nodule?"})
    as_json = live.post("blip_vqa", "vqa", json={"image": b64(image), "question": "where is the nodule?"})
    assert upload.status_code == 200 == as_json.status_code, upload.text
    assert upload.json()["text"] == as_json.json()["text"]  # greedy decoding: same input, same answer


@pytest.mark.slow
def test_attention_map_is_a_patch_grid_or_a_clear_400(live):
    import importlib

    from medvl.models.base import Recipe
    from medvl.models.registry import RECIPES

    for recipe, endpoint, fields in [("blip_caption", "caption", {}),
                                     ("blip_vqa", "vqa", {"question": "is there an effusion?"})]:
        module, _, name = RECIPES[recipe].implementation.partition(":")
        has_maps = getattr(importlib.import_module(module), name).attention_maps is not Recipe.attention_maps
        response = live.post(recipe, endpoint, json={"image": b64(png()), "attention": True, **fields})
        if has_maps:
            assert response.status_code == 200, response.text
            attention = response.json()["attention"]
            assert (attention["rows"], attention["cols"]) == (SIZE // 16, SIZE // 16)
            assert sum(map(sum, attention["map"])) == pytest.approx(1.0, abs=1e-3)
        else:
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "attention_not_available"
    assert "attention" not in live.post("blip_caption", "caption", json={"image": b64(png())}).json()


def truncated_png() -> bytes:
    """Opens (the header is intact) but does not decode (half the pixel data is cut off)."""
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_INPUTS = [
    # (recipe, endpoint, request kwargs, status, error code)
    ("blip_caption", "caption", {"json": {"image": "%%% not base64 %%%"}}, 400, "invalid_base64"),
    ("blip_caption", "caption", {"json": {"image": b64(b"GIF? no: plain text")}}, 400, "not_an_image"),
    ("blip_caption", "caption", {"json": {"image": b64(truncated_png())}}, 400, "not_an_image"),
    ("blip_caption", "caption", {"json": {"image": b64(secrets.token_bytes(60_000))}}, 413, "image_too_large"),
    ("blip_caption", "caption", {"json": {"image": b64(png(400, 400))}}, 413, "image_too_large"),
    ("blip_caption", "caption", {"data": b"x" * 300_000, "headers": {"Content-Type": "application/json"}}, 413,
     "body_too_large"),
    ("blip_caption", "caption", {"json": {}}, 400, "missing_field"),
    ("blip_caption", "caption", {"json": {"image": ["not", "a", "string"]}}, 400, "wrong_type"),
    ("blip_caption", "caption", {"json": {"image": b64(png()), "attention": 1}}, 400, "wrong_type"),
    ("blip_caption", "caption", {"json": {"image": b64(png()), "question": "is it?"}}, 400, "question_not_supported"),
    ("blip_caption", "caption", {"data": b"{oops", "headers": {"Content-Type": "application/json"}}, 400,
     "invalid_json"),
    ("blip_caption", "caption", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("blip_caption", "caption", {"files": {"question": (None, "why?")}}, 400, "missing_field"),
    ("blip_caption", "vqa", {"json": {"image": b64(png()), "question": "is it?"}}, 404, "unsupported_endpoint"),
    ("blip_caption", "nonsense", {"json": {"image": b64(png())}}, 404, "unsupported_endpoint"),
    ("blip_vqa", "vqa", {"json": {"image": b64(png())}}, 400, "missing_field"),
    ("blip_vqa", "vqa", {"json": {"image": b64(png()), "question": ["a", "list"]}}, 400, "wrong_type"),
    ("blip_vqa", "caption", {"json": {"image": b64(png())}}, 404, "unsupported_endpoint"),
    ("blip_vqa", "vqa", {"data": b'{"image": "%s", "question": "\\ud800?"}' % b64(png()).encode(),
                         "headers": {"Content-Type": "application/json"}}, 400, "invalid_text"),
    ("blip_caption", "caption", {"data": b"[" * 50_000, "headers": {"Content-Type": "application/json"}}, 400,
     "invalid_json"),
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, endpoint, request_kwargs, status, code", BAD_INPUTS,
                         ids=[f"{r}-{e}-{c}-{i}" for i, (r, e, _, _, c) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_4xx_and_the_replica_lives_on(live, recipe, endpoint, request_kwargs, status, code):
    response = live.post(recipe, endpoint, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if code == "unsupported_endpoint":
        supported = {"blip_caption": "/v1/caption", "blip_vqa": "/v1/vqa"}[recipe]
        assert error["supported"] == supported and supported in error["message"]
    assert live.replica(recipe) == live.replicas[recipe]  # the same replica, not a restarted one


@pytest.mark.slow
def test_a_bad_image_in_a_batch_fails_only_its_own_request(live):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"image": b64(png(colour=(i * 40, 0, 0)))} for i in range(3)] + [{"image": b64(truncated_png())}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: live.post("blip_caption", "caption", json=body), bodies))
    assert [r.status_code for r in responses] == [200, 200, 200, 400], [r.text for r in responses]
    assert max(r.json()["batch_size"] for r in responses[:3]) >= 2  # they did share a batch


@pytest.mark.slow
def test_a_lone_surrogate_question_fails_only_its_own_request(live):
    from concurrent.futures import ThreadPoolExecutor

    good = {"image": b64(png()), "question": "is there an effusion?"}
    bad = b'{"image": "%s", "question": "\\ud800?"}' % b64(png()).encode()
    calls = [{"json": good}] * 3 + [{"data": bad, "headers": {"Content-Type": "application/json"}}]
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda kwargs: live.post("blip_vqa", "vqa", **kwargs), calls))
    assert [r.status_code for r in responses] == [200, 200, 200, 400], [r.text for r in responses]
    assert live.get("blip_vqa", "/healthz", key=None).json()["status"] == "ok"


@pytest.mark.slow
def test_api_key_is_required_where_set_and_never_logged(live, ray_local):
    good = {"json": {"image": b64(png())}}
    assert live.post("blip_caption", "caption", key=None, **good).status_code == 401
    wrong = live.post("blip_caption", "caption", key="not-" + KEY, **good)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert live.get("blip_caption", "/v1/model", key=None).status_code == 401
    assert live.post("blip_caption", "caption", **good).status_code == 200
    import requests

    as_header = requests.post(f"{live.url}/blip_caption/v1/caption", headers={"X-API-Key": KEY}, timeout=60, **good)
    assert as_header.status_code == 200
    assert live.get("blip_caption", "/healthz", key=None).status_code == 200  # health checks need no key
    assert live.post("blip_vqa", "vqa", key=None, json={"image": b64(png()), "question": "yes?"}).status_code == 200

    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.slow
def test_unknown_path_and_wrong_method_answer_json(live):
    unknown = live.get("blip_caption", "/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = live.get("blip_caption", "/v1/caption")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert all(live.replica(recipe) == replica for recipe, replica in live.replicas.items())


@pytest.mark.slow
def test_a_schema_driven_fuzzer_gets_no_server_error_and_the_replicas_live_on(live, tmp_path: Path):
    """Schemathesis against each live app's OpenAPI document: every operation, positive and negative bodies."""
    schemathesis_cli = Path(sys.executable).with_name("st")
    if not schemathesis_cli.exists():
        pytest.skip("schemathesis is not installed (pip install -e .[test])")
    endpoints = {"blip_caption": "caption", "blip_vqa": "vqa"}
    for recipe in LIVE:
        config = tmp_path / f"{recipe}.toml"  # the model's own endpoint: a random one only ever meets the 404
        config.write_text(f'[parameters]\n"path.endpoint" = "{endpoints[recipe]}"\n')
        command = [str(schemathesis_cli), "--config-file", str(config), "run", f"{live.url}/{recipe}/openapi.json",
                   "--url", f"{live.url}/{recipe}", "--checks", "not_a_server_error", "--max-examples", "100",
                   "--seed", "15", "--workers", "2", "--header", f"Authorization: Bearer {KEY}",
                   "--generation-database", "none", "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
                   "--no-color"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        print(f"\n--- schemathesis, {recipe} ---\n{run.stdout[-2500:]}")
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert live.replica(recipe) == live.replicas[recipe]  # the same replica, not a restarted one
    good = live.post("blip_vqa", "vqa", json={"image": b64(png()), "question": "is there an effusion?"})
    assert good.status_code == 200, good.text
