"""Many LoRA adapters on one base (issue 17): two adapters of one base served by one runner, each request answered
by the adapter it names, as that adapter alone generates; structured findings equal the labeler's; a stream hands
out text while the model still generates; a request's temperature samples. Then one live Serve app (slow): each
adapter answers as `medvl eval` of it generates, the real `openai` client talks to it (streaming and not),
/v1/models lists both and counts one base load per replica, and a killed replica comes back with its adapters."""
from __future__ import annotations

import base64
import json
import queue
import threading
import time
from pathlib import Path

import pytest
import torch

from medvl.eval.chexpert import CheXpertLabeler
from medvl.eval.findings import structured_findings
from medvl.serve.requests import Query
from medvl.spec import SpecError, parse_spec
from tests.test_serve import SIZE, TEXTS, free_port, job, png


EVAL_IMAGE = png(colour=(90, 160, 30))  # served below, and the first image of the eval split


def write_eval_split(location: Path, images: list[bytes]) -> None:
    """A test split of these images (and one validation row: prepare's splits are all there), for `medvl eval`."""
    from medvl.data.records import Record
    from medvl.data.shards import write_shards

    rows = [Record(f"img{i}", f"g{i}", image, "small left pleural effusion", split="test")
            for i, image in enumerate(images)]
    rows.append(Record("val0", "gv", png(colour=(10, 10, 10)), "cardiomegaly", split="val"))
    write_shards(rows, str(location), source="test", format="shards")


def save_adapter(recipe, base: str, out: Path, seed: int) -> str:
    """A LoRA adapter whose B matrices are random (peft starts them at zero: every adapter would equal the base)."""
    model = recipe.load_for_training(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    recipe.save(model, base, out)
    return str(out)


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> dict:
    """One base, two adapters, and a tune stage's trial_models.json naming them best first (as a search leaves)."""
    from medvl.models.blip2 import save_tiny_blip2
    from medvl.models.registry import build_recipe
    from medvl.runs import RunLayout, TuneLayout

    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_blip2(root / "blip2", TEXTS, SIZE)
    recipe = build_recipe(parse_spec(job("blip2", base, root)))
    layout = TuneLayout(RunLayout.of(root / "run").stage("tune"))
    trials = []
    for i, (trial_id, lr) in enumerate((("trial_a", 1e-2), ("trial_b", 1e-3))):
        folder = save_adapter(recipe, base, layout.trial_model(trial_id), seed=i)
        trials.append({"trial_id": trial_id, "config": {"train.lr": lr}, "metric": "val_loss", "value": 1.0 + i,
                       "steps": 4, "model_dir": folder})
    layout.trial_models.write_text(json.dumps(trials))
    write_eval_split(root / "run" / "shards", [EVAL_IMAGE, png()])
    raw = job("blip2", base, root / "run", adapters=["top:2"])
    raw["stages"] = [{"kind": "tune", "name": "tune"}, "serve"]
    raw["tune"] = {"space": "blip2_lora"}
    raw["eval"]["max_new_tokens"] = 8
    return {"raw": raw, "base": base, "folders": [t["model_dir"] for t in trials]}


def test_top_k_names_the_best_trials_of_the_tune_stage(search):
    from medvl.serve.adapters import resolve_adapters

    adapters = resolve_adapters(parse_spec(search["raw"]))
    assert [(a["name"], a["folder"], a["config"]) for a in adapters] == [
        ("trial_a", search["folders"][0], {"train.lr": 1e-2}), ("trial_b", search["folders"][1], {"train.lr": 1e-3})]
    raw = {**search["raw"], "serve": {**search["raw"]["serve"], "adapters": ["top:2", search["folders"][0]]}}
    with pytest.raises(SpecError, match="serve.adapters"):
        resolve_adapters(parse_spec(raw))


def test_each_adapter_answers_as_it_does_alone_from_one_base(search, monkeypatch):
    from medvl.models.registry import build_recipe
    from medvl.serve.adapters import resolve_adapters
    from medvl.serve.runner import ModelRunner

    spec = parse_spec(search["raw"])
    loads = []
    recipe_class = type(build_recipe(spec))
    original = recipe_class.load_for_inference
    monkeypatch.setattr(recipe_class, "load_for_inference", lambda self, d: loads.append(d) or original(self, d))
    runner = ModelRunner(spec, "", resolve_adapters(spec))
    image = Query(png(colour=(90, 160, 30)))
    mixed = [runner.answer_with(name, [image])[0]["text"] for name in ("trial_b", "trial_a", "trial_b")]
    assert len(loads) == 1  # the base, once
    runner.unload_adapter("trial_b")
    assert "trial_b" not in runner.resident and runner.answer_with("trial_b", [image])[0]["text"] == mixed[0]
    alone = [ModelRunner(spec, folder).answer([image])[0]["text"] for folder in search["folders"]]
    assert mixed == [alone[1], alone[0], alone[1]]
    assert alone[0] != alone[1], alone  # the adapters differ, so the switch is seen


def single_model_runner(search, folder: int = 0):
    from medvl.serve.runner import ModelRunner

    spec = parse_spec({**search["raw"], "serve": {**search["raw"]["serve"], "adapters": []}})
    return ModelRunner(spec, search["folders"][folder])


def test_a_stream_hands_out_text_while_the_model_still_generates(search, monkeypatch):
    """The decoder's next step after the first piece is held until the test has that piece: a stream that only
    sent text after generation would never release it (the wait would run out and the check below fail)."""
    runner = single_model_runner(search)
    decoder = runner.loaded.module.get_base_model().language_model
    piece_sent, test_saw_it = threading.Event(), threading.Event()
    original = decoder.forward

    def gated_step(*args, **kwargs):
        if piece_sent.is_set():
            test_saw_it.wait(timeout=120)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", gated_step)
    pieces: queue.Queue = queue.Queue()
    finished = threading.Event()
    answers = []

    def on_piece(text: str) -> None:
        pieces.put(text)
        piece_sent.set()

    def stream() -> None:
        answers.append(runner.stream("", Query(EVAL_IMAGE), on_piece))
        finished.set()

    worker = threading.Thread(target=stream)
    worker.start()
    first = pieces.get(timeout=120)
    generating_when_first_piece_arrived = not finished.is_set()
    test_saw_it.set()
    worker.join()
    streamed = [first] + [pieces.get_nowait() for _ in range(pieces.qsize())]
    assert generating_when_first_piece_arrived
    # live pieces are a prefix of the answer (its last word follows when generation ends: see PieceStreamer)
    assert len(streamed) >= 2 and answers[0]["text"].startswith("".join(streamed))
    assert answers[0]["text"] == runner.answer([Query(EVAL_IMAGE)])[0]["text"]  # streaming changes no word


class SpacedWords:
    """A tokenizer's decode as BERT's cleans it up: words joined by spaces, then "it ' s" → "it's", "x ." → "x."."""

    words = ["it", "'", "s", "a", "small", "effusion", "."]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids).replace(" ' ", "'").replace(" .", ".")


def test_streamed_pieces_are_never_taken_back_by_a_later_token():
    from medvl.models.scored_generation import PieceStreamer

    pieces: list[str] = []
    streamer = PieceStreamer(SpacedWords(), pieces.append)
    streamer.put(torch.tensor([[]], dtype=torch.long))  # the prompt generate starts from
    for token in range(len(SpacedWords.words)):
        streamer.put(torch.tensor([token]))
    final = SpacedWords().decode(range(len(SpacedWords.words)))
    assert final == "it's a small effusion." and len(pieces) >= 2 and final.startswith("".join(pieces)), pieces


def test_temperature_zero_is_greedy_and_a_high_temperature_samples(search):
    from medvl.serve.openai_api import parse_chat

    runner = single_model_runner(search)
    greedy = runner.answer([Query(EVAL_IMAGE)])[0]
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(EVAL_IMAGE).decode()}}]}]}
    cold = parse_chat(json.dumps({**body, "temperature": 0}).encode(), runner.spec.serve, False).query
    hot = parse_chat(json.dumps({**body, "temperature": 2}).encode(), runner.spec.serve, False).query
    assert (cold.temperature, hot.temperature) == (0.0, 2.0)
    # one batch mixing both: the cold queries stay greedy, the hot ones are sampled (one group each)
    answers = runner.answer([cold, hot, hot, cold, hot, hot, hot, hot])
    assert [answers[i]["text"] for i in (0, 3)] == [greedy["text"]] * 2
    assert answers[0]["mean_token_prob"] == pytest.approx(greedy["mean_token_prob"], rel=1e-5)  # batch of 2 vs 1
    sampled = [a["text"] for a in answers if a is not answers[0] and a is not answers[3]]
    assert len(set(sampled)) >= 2, sampled
    # the confidence is the model's probability of the sampled tokens, not their probability at temperature 2
    assert all(0.0 < a["mean_token_prob"] <= 1.0 for a in answers)


def test_a_seed_makes_a_sampled_answer_repeat_whatever_runs_before_or_beside_it(search):
    from medvl.serve.openai_api import parse_chat
    from medvl.serve.requests import RequestError

    runner = single_model_runner(search)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(EVAL_IMAGE).decode()}}]}]}

    def query(**fields) -> Query:
        return parse_chat(json.dumps({**body, **fields}).encode(), runner.spec.serve, False).query

    seeded = [query(temperature=2, seed=seed) for seed in (11, 12, 13, 14)]
    alone = [runner.answer([q])[0]["text"] for q in seeded]
    assert len(set(alone)) >= 2, alone  # the seed chooses the draws (else the test below proves nothing)
    torch.manual_seed(0)  # the global generator is not what a seeded request draws from
    hot, cold = query(temperature=2), query(temperature=0, seed=11)
    batch = runner.answer([hot, seeded[1], cold, seeded[0], hot, seeded[3], seeded[2], seeded[0]])
    assert [batch[i]["text"] for i in (3, 1, 6, 5, 7)] == [alone[0], alone[1], alone[2], alone[3], alone[0]]
    assert batch[2]["text"] == runner.answer([query()])[0]["text"]  # a seed at temperature 0: greedy, as without
    streamed = runner.stream("", seeded[0], lambda piece: None)
    assert streamed["text"] == alone[0]
    for wrong in ("7", 1.5, True, [1]):
        with pytest.raises(RequestError) as refused:
            query(temperature=1, seed=wrong)
        assert (refused.value.status, refused.value.extra) == (400, {"field": "seed"})
        assert '"seed" must be an integer' in refused.value.message
    assert query(seed=2**80).seed == 2**80  # any integer: torch's 64-bit seed is taken from it


def test_a_report_answer_carries_the_labelers_findings(search):
    from medvl.serve.runner import ModelRunner

    spec = parse_spec({**search["raw"], "serve": {**search["raw"]["serve"], "adapters": []}})
    (answer,) = ModelRunner(spec, search["folders"][0]).answer([Query(png())])
    labels = CheXpertLabeler().label(answer["text"])
    status = {1.0: "present", -1.0: "uncertain", 0.0: "absent"}
    assert {k: v["status"] for k, v in answer["findings"].items()} == {
        k: status[v] for k, v in labels.items() if v is not None}


def test_findings_take_the_confidence_of_the_sentence_that_stated_them():
    text = "Small left pleural effusion. No pneumothorax. Possible right effusion."
    ends = [len(text[: text.index(".") + 1]), len(text[: text.index("x.") + 2]), len(text)]
    out = structured_findings(CheXpertLabeler(), text, [0.3, 0.9, 0.6], ends)
    effusion, pneumothorax = out["findings"]["Pleural Effusion"], out["findings"]["Pneumothorax"]
    assert (effusion["status"], effusion["confidence"], effusion["side"]) == ("present", 0.3, "left")
    assert (pneumothorax["status"], pneumothorax["confidence"]) == ("absent", 0.9)
    assert "Pleural Effusion is stated present with low confidence (0.30)" in out["warnings"]
    both = structured_findings(CheXpertLabeler(), "Left pleural effusion. Right pleural effusion.")
    assert both["findings"]["Pleural Effusion"]["side"] == "bilateral"
    assert any("left and on the right" in w for w in both["warnings"])
    contradiction = structured_findings(CheXpertLabeler(), "Small right pneumothorax. No pneumothorax.")
    assert any("both present and absent" in w for w in contradiction["warnings"])


def eval_predictions(search, adapter: str, folder: str) -> dict[str, str]:
    """What `medvl eval` of one adapter generates for each image of the eval split (id → text)."""
    from medvl.eval.evaluate import run_eval_stage
    from medvl.runs import RunLayout
    from medvl.spec import StageSpec

    eval_settings = {**search["raw"]["eval"], "calibrate": False, "semantic": False, "require_java": False,
                     "worst_examples": 0}
    spec = parse_spec({**search["raw"], "eval": eval_settings})
    stage = f"eval_{adapter}"
    run_eval_stage(spec, StageSpec(kind="eval", name=stage), folder)
    rows = RunLayout.for_spec(spec).predictions(stage).read_text().splitlines()
    return {row["id"]: row["prediction"] for row in map(json.loads, rows)}


def replica_stats(url: str) -> dict:
    import requests

    return requests.get(f"{url}/v1/models", timeout=60).json()["replica"]


def kill_replica_and_wait_for_its_successor(url: str, app: str, old_replica: str) -> str:
    """Kill the app's one replica actor as a crash would; Serve starts another. Returns the new replica's id."""
    import ray
    import requests

    # Serve names each replica actor "SERVE_REPLICA::<app>#<deployment>#<id>" in its own namespace.
    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app}#MedvlServer#")]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    deadline = time.monotonic() + 300  # a wait, not an assertion on speed: the replica reloads its model
    while time.monotonic() < deadline:
        try:
            health = requests.get(f"{url}/healthz", timeout=10)
            if health.status_code == 200 and health.json()["replica"] != old_replica:
                return health.json()["replica"]
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError("no healthy replica replaced the killed one within 300 s")


@pytest.mark.slow
def test_live_adapters_answer_as_eval_and_survive_a_replica_restart(search, ray_local):
    import requests
    from openai import OpenAI
    from ray import serve

    from medvl.serve.adapters import resolve_adapters
    from medvl.serve.command import application

    # A real chest radiograph (512 × 512, 183 kB) where ../shared has one: above test_serve's tight limits.
    spec = parse_spec({**search["raw"], "serve": {**search["raw"]["serve"], "max_image_bytes": 400_000,
                                                  "max_image_pixels": 512 * 512}})
    adapters = resolve_adapters(spec)
    evaluated = {a["name"]: eval_predictions(search, a["name"], a["folder"])["img0"] for a in adapters}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(spec, adapters[0]["folder"], "", adapters), name="adapters", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        image = EVAL_IMAGE

        def answers_by_body() -> dict[str, dict]:
            return {n: requests.post(f"{url}/v1/report", json={"image": base64.b64encode(image).decode(),
                                                                "model": n}, timeout=60).json()
                    for n in ("trial_a", "trial_b")}

        by_body = answers_by_body()
        by_header = requests.post(f"{url}/v1/report", json={"image": base64.b64encode(image).decode()},
                                  headers={"serve_multiplexed_model_id": "trial_b"}, timeout=60).json()
        assert all("text" in a for a in by_body.values()), by_body
        assert by_body["trial_a"]["text"] != by_body["trial_b"]["text"], by_body
        assert {n: a["text"] for n, a in by_body.items()} == evaluated  # what `medvl eval` of each generates
        assert by_header["text"] == by_body["trial_b"]["text"] and by_header["model"] == "trial_b"
        unknown = requests.post(f"{url}/v1/report", json={"image": base64.b64encode(image).decode(), "model": "x"},
                                timeout=60)
        assert unknown.status_code == 404 and unknown.json()["error"]["available"] == ["trial_a", "trial_b"]
        models = requests.get(f"{url}/v1/models", timeout=60).json()
        assert [(m["id"], m["searched"], m["value"]) for m in models["data"]] == [
            ("trial_a", {"train.lr": 1e-2}, 1.0), ("trial_b", {"train.lr": 1e-3}, 2.0)]
        # counted inside the live replica: one base, trial_b loaded into it (trial_a came with the base)
        first = models["replica"]
        assert (first["base_loads"], first["adapter_loads"]) == (1, 1), first
        assert sorted(first["resident"]) == ["trial_a", "trial_b"]

        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        chest = (Path(__file__).parent.parent.parent / "shared" / "data" / "cxr_samples" / "00000001_000.png")
        picture = chest.read_bytes() if chest.is_file() else image
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                        base64.b64encode(picture).decode()}}]
        completion = client.chat.completions.create(model="trial_a", messages=[{"role": "user", "content": content}],
                                                    max_tokens=8)
        assert completion.choices[0].message.content
        stream = client.chat.completions.create(model="trial_a", messages=[{"role": "user", "content": content}],
                                                stream=True)
        chunks = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
        assert len(chunks) >= 2 and "".join(chunks) == completion.choices[0].message.content
        sampled = client.chat.completions.create(model="trial_b", messages=[{"role": "user", "content": content}],
                                                 temperature=1.5)
        assert sampled.choices[0].message.content is not None

        def seeded_text(**extra) -> str:
            return client.chat.completions.create(model="trial_b", messages=[{"role": "user", "content": content}],
                                                  temperature=2.0, seed=2024, **extra).choices[0].message.content

        repeatable = seeded_text()  # then a sampled request without a seed, drawing from the replica's global RNG
        unseeded = client.chat.completions.create(model="trial_b", messages=[{"role": "user", "content": content}],
                                                  temperature=2.0).choices[0].message.content
        assert seeded_text() == repeatable, (repeatable, unseeded)
        seeded_stream = client.chat.completions.create(model="trial_b", messages=[{"role": "user", "content": content}],
                                                       temperature=2.0, seed=2024, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in seeded_stream) == repeatable

        # A replica restarted by Serve comes back with its adapters, loading its base once.
        successor = kill_replica_and_wait_for_its_successor(url, "adapters", first["id"])
        assert {n: a["text"] for n, a in answers_by_body().items()} == evaluated
        again = replica_stats(url)
        assert again["id"] == successor != first["id"] and again["base_loads"] == 1, again
    finally:
        serve.shutdown()
