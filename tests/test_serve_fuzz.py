"""Property-based fuzzing of what a replica does with a request, in-process (no Ray): random JSON, random bytes as
images, random Unicode questions (lone surrogates included), random multipart bodies, with and without
Content-Length. Every answer must be a 200 or one of the documented refusals, never a 5xx or an exception, and
a good request batched with the fuzzed one must still be answered; afterwards the model must pass its health
check. The live server gets a schema-driven fuzzer in tests/test_serve.py."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medvl.serve.requests import REFUSALS, Query, RequestError, read_query
from medvl.spec import ServeSpec, parse_spec

SIZE = 32
TEXTS = ["no acute finding", "small left pleural effusion", "is there an effusion?", "yes", "no"] * 4
LIMITS = ServeSpec(max_image_bytes=20_000, max_image_pixels=50_000, max_question_chars=200)
DOCUMENTED = {200, *REFUSALS}
FUZZ = settings(max_examples=150, deadline=10_000, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def encoded(width: int, height: int, colour: tuple[int, int, int], format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=format)
    return buffer.getvalue()


GOOD_PNG = encoded(SIZE, SIZE, (200, 40, 40), "PNG")

# ------------------------------------------------------------------------------------------- strategies

any_text = st.text(st.characters(exclude_categories=()), max_size=60)  # every code point, lone surrogates too
# Code points that break text handling, drawn far more often than among all of Unicode: lone surrogates, controls,
# format characters, private use, unassigned.
odd_text = st.one_of(
    st.text(st.one_of(st.characters(categories=["Cs", "Cc", "Cf", "Co", "Cn"]), st.characters()), min_size=1,
            max_size=40),
    st.builds("".join, st.tuples(st.text(max_size=10), st.characters(categories=["Cs"]), st.text(max_size=10))),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
images = st.one_of(
    st.binary(max_size=3_000),  # noise
    st.builds(encoded, st.integers(1, 300), st.integers(1, 300), st.tuples(*[st.integers(0, 255)] * 3),
              st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF"])),
    st.builds(lambda data, cut: data[:cut], st.just(GOOD_PNG), st.integers(0, len(GOOD_PNG))),  # truncated
    st.builds(lambda tail: b"\0" * 128 + b"DICM" + tail, st.binary(max_size=500)),  # a DICOM preamble, then noise
    st.binary(min_size=20_001, max_size=21_000),  # over max_image_bytes
)
image_fields = st.one_of(
    images.map(lambda data: base64.b64encode(data).decode()),
    images.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode()),
    any_text,
    json_values,
)
questions = st.one_of(any_text, st.text(min_size=190, max_size=260), json_values, st.just("is there an effusion?"))
attention = st.one_of(st.booleans(), json_values)
small_images = st.builds(encoded, st.integers(1, 64), st.integers(1, 64), st.tuples(*[st.integers(0, 255)] * 3),
                         st.sampled_from(["PNG", "JPEG"]))
good_images = small_images.map(lambda data: base64.b64encode(data).decode())
plausible_objects = st.one_of(  # a good image: the question and flags decide, and the model often runs
    st.fixed_dictionaries({"image": good_images, "question": st.text(min_size=1, max_size=40)},
                          optional={"attention": st.booleans()}),
    st.fixed_dictionaries({"image": good_images}, optional={"question": any_text, "attention": st.booleans()}),
)
odd_question_objects = st.fixed_dictionaries({"image": good_images, "question": odd_text})
field_objects = st.fixed_dictionaries(
    {"image": image_fields},
    optional={"question": questions, "attention": attention, "extra": json_values},
)


@st.composite
def plausible_json_bodies(draw) -> tuple[bytes, str]:
    text = json.dumps(draw(st.one_of(plausible_objects, odd_question_objects)), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass"), "application/json"


@st.composite
def json_bodies(draw) -> tuple[bytes, str]:
    value = draw(st.one_of(field_objects, json_values))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass"), draw(st.sampled_from(["application/json", ""]))


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["medvl-fuzz", "x" * 70, ""]))
    parts = []
    names = st.one_of(st.sampled_from(["image", "question", "attention"]), any_text)
    if draw(st.booleans()):  # a well-formed image part first: what follows decides
        parts.append(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="image"; '
                     b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n' + draw(small_images) + b"\r\n")
    for _ in range(draw(st.integers(0, 4))):
        name = draw(names).encode("utf-8", "surrogatepass")
        if draw(st.booleans()):  # a file part
            filename = draw(any_text).encode("utf-8", "surrogatepass")
            header = b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n'
            header += b"Content-Type: " + draw(st.sampled_from([b"image/png", b"application/octet-stream"])) + b"\r\n"
            value = draw(st.one_of(small_images, images))
        else:
            header = b'Content-Disposition: form-data; name="' + name + b'"\r\n'
            value = draw(st.one_of(any_text, st.sampled_from(["true", "false", "1", "0"]))).encode("utf-8",
                                                                                                  "surrogatepass")
        parts.append(b"--" + boundary.encode() + b"\r\n" + header + b"\r\n" + value + b"\r\n")
    end = b"--" + boundary.encode() + b"--\r\n" if draw(st.booleans()) else draw(st.binary(max_size=20))
    body = b"".join(parts) + end
    return body, f"multipart/form-data; boundary={boundary}" if boundary else "multipart/form-data"


other_bodies = st.tuples(st.binary(max_size=2_000), st.one_of(any_text, st.sampled_from(["text/plain", "image/png"])))
requests = st.tuples(st.one_of(plausible_json_bodies(), json_bodies(), multipart_bodies(), other_bodies), st.booleans(),
                     st.integers(1, 4096))


def starlette_request(body: bytes, content_type: str, with_length: bool, chunk: int):
    from starlette.requests import Request

    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent = iter(range(len(chunks)))

    async def receive() -> dict:
        i = next(sent, None)
        if i is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    headers = [(b"content-type", content_type.encode("latin-1", "replace"))]
    if with_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/x", "query_string": b"", "headers": headers,
             "app": object()}  # with an app in scope Starlette answers bad multipart framing as HTTPException(400)
    return Request(scope, receive)


def answer(runner, takes_question: bool, body: bytes, content_type: str, with_length: bool, chunk: int) -> int:
    """The status the replica answers; asserts that a good request batched with it is answered."""
    from starlette.exceptions import HTTPException

    request = starlette_request(body, content_type, with_length, chunk)
    try:
        query = asyncio.run(read_query(request, LIMITS, takes_question))
    except RequestError as refused:
        return refused.status
    except HTTPException as refused:  # the app's handler answers it as JSON with this status
        return refused.status_code
    good = Query(GOOD_PNG, "is there an effusion?" if takes_question else "")
    fuzzed, other = runner.answer([query, good])
    assert isinstance(other, dict) and other["text"] is not None, other
    return fuzzed.status if isinstance(fuzzed, RequestError) else 200


GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"
KNOWN_CASES = [  # (body, content type), Content-Length sent, chunk size
    ((b'{"image": "%s", "question": "\\ud800?"}' % GOOD_B64.encode(), "application/json"), True, 4096),
    ((b'{"image": "%s", "question": "\xed\xa0\x80?"}' % GOOD_B64.encode(), "application/json"), True, 4096),
    ((b"[" * 100_000, "application/json"), False, 4096),
    ((json.dumps({"image": base64.b64encode(EPS).decode()}).encode(), "application/json"), True, 4096),
    ((b'{"image": "x", "\\udc80": 1}', "application/json"), True, 4096),
    ((b"--b\r\n" + b"x" * 200_000, "multipart/form-data; boundary=b"), False, 1024),
]

# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=["blip_caption", "blip_vqa"])
def runner(request, tmp_path_factory):
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    from medvl.models.blip_caption import save_tiny_blip
    from medvl.serve.runner import ModelRunner

    recipe = request.param
    model_class = BlipForQuestionAnswering if recipe == "blip_vqa" else BlipForConditionalGeneration
    model = save_tiny_blip(model_class, tmp_path_factory.mktemp("fuzz") / recipe, TEXTS, SIZE)
    raw = {"name": "fuzz", "output_dir": str(tmp_path_factory.mktemp("out")), "stages": ["serve"],
           "data": {"task": "vqa" if recipe == "blip_vqa" else "caption", "image_size": SIZE,
                    "max_text_length": 8, "max_question_length": 12},
           "model": {"recipe": recipe, "name_or_path": model},
           "eval": {"num_beams": 1, "max_new_tokens": 3}, "serve": {"checkpoint": model}}
    return ModelRunner(parse_spec(raw), model)


@pytest.mark.slow  # no Ray, but ~300 generations: 30-100 s on 2 shared CPUs
def test_every_fuzzed_request_gets_a_documented_answer_and_the_model_lives_on(runner, one_thread):
    takes_question = runner.recipe.task == "vqa"
    seen: dict[int, int] = {}

    @FUZZ
    @given(requests)
    def fuzz(case):
        (body, content_type), with_length, chunk = case
        status = answer(runner, takes_question, body, content_type, with_length, chunk)
        assert status in DOCUMENTED, (status, body[:200], content_type)
        seen[status] = seen.get(status, 0) + 1

    for case in KNOWN_CASES:  # what broke the server once, every run (besides what the fuzzer finds)
        fuzz.hypothesis.inner_test(case)
    fuzz()
    print(f"\n{runner.spec.model.recipe}: answers by status {dict(sorted(seen.items()))}")
    assert seen.get(400) and len(seen) >= 2  # the fuzzer reached past the first refusal
    runner.check_health()
    assert not runner.suspect  # no fuzzed request made the model fail
    assert answer(runner, takes_question, json.dumps({"image": base64.b64encode(GOOD_PNG).decode(),
                                                      **({"question": "yes?"} if takes_question else {})}).encode(),
                  "application/json", True, 4096) == 200
