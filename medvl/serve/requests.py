"""Turn an HTTP request into a validated :class:`Query`, or a :class:`RequestError` that becomes a 4xx answer.

Two request forms, with the same fields:

* JSON: ``{"image": "<base64, or a data: URL>", "question": "…", "attention": true}``
* multipart/form-data: an ``image`` file, and ``question`` / ``attention`` as form fields.

Everything here runs before a request joins a batch, so one bad request can never fail the others in its
batch. The image is only *opened* here (header: format and size); it is decoded once, by the recipe's own
preprocessor, and a file whose body turns out to be corrupt is answered 400 from there.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from medvl.data.images import PILLOW_FORMATS, is_dicom
from medvl.spec import ServeSpec

FIELDS = ("image", "question", "attention", "model")
# JSON carries the image as base64 (4 characters per 3 bytes), plus the other fields.
BODY_SLACK_BYTES = 64 * 1024


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}}
GREY_8PX_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNsYIAAJgaKGAAmCACQXTClHgAAAABJRU5ErkJggg=="
# What POST /v1/<endpoint> takes and answers, for the OpenAPI document (the route reads the body itself).
OPENAPI_EXTRA = {"requestBody": {"required": True, "content": {
    "application/json": {"examples": {
        "caption or report": {"value": {"image": GREY_8PX_PNG}},
        "vqa": {"value": {"image": GREY_8PX_PNG, "question": "is there an effusion?"}},
    }, "schema": {
        "type": "object", "required": ["image"], "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "description": "the image file (PNG, JPEG or DICOM) in base64, or a data: URL"},
            "question": {"type": "string", "description": "VQA models only"},
            "attention": {"type": "boolean", "description": "add the cross-attention map (BLIP captioning)"},
            "model": {"type": "string", "description": "the adapter to answer with (GET /v1/models)"},
        }}},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "question": {"type": "string"},
            "attention": {"type": "string", "enum": ["true", "false", "1", "0"]},
            "model": {"type": "string"},
        }}},
}}}
REFUSALS = {  # every status a refused request can get (see the README's table)
    400: "the body's fields, the image, the question or the multipart framing",
    401: "the API key is missing or wrong",
    404: "another model's endpoint",
    413: "the body, the image or the question is over its limit",
    415: "neither JSON nor multipart",
}
OPENAPI_RESPONSES = {status: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                     for status, text in REFUSALS.items()}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a stable machine-readable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


@dataclass
class Query:
    image: bytes
    question: str = ""
    attention: bool = False
    model: str = ""  # the adapter asked for by name ("" = the header's, else the first); see medvl.serve.adapters
    temperature: float = 0.0  # > 0: sampled at this temperature (OpenAI's); 0: the deployment's greedy / beam search
    seed: int | None = None  # with temperature > 0: sampled from a generator seeded with it (the same draws each time)


def max_body_bytes(settings: ServeSpec) -> int:
    return settings.max_image_bytes * 4 // 3 + settings.max_question_chars * 4 + BODY_SLACK_BYTES


def check_content_length(header: str | None, settings: ServeSpec) -> None:
    """Refuse an oversized body from its Content-Length, before reading it."""
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise RequestError(400, "bad_content_length", f"Content-Length must be an integer, got {header!r}") from None
    if length > max_body_bytes(settings):
        raise RequestError(413, "body_too_large", f"the request body has {length} bytes; at most "
                           f"{max_body_bytes(settings)} are accepted (images up to {settings.max_image_bytes} bytes)")


async def read_query(request: Any, settings: ServeSpec, takes_question: bool) -> Query:
    """A Starlette request → Query; the body is counted as it arrives and refused at the cap, whatever
    Content-Length claims or when there is none (chunked uploads): JSON and multipart alike."""
    check_content_length(request.headers.get("content-length"), settings)
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    request = capped(request, max_body_bytes(settings))
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=len(FIELDS))
        try:
            return parse_form(form, settings, takes_question)
        finally:
            await form.close()
    if content_type in ("application/json", ""):
        return parse_json(await request.body(), settings, takes_question)
    raise RequestError(415, "unsupported_media_type", f"send application/json or multipart/form-data, "
                       f"got {content_type}")


def capped(request: Any, limit: int) -> Any:
    """The same request, its body stream raising 413 as soon as more than ``limit`` bytes arrived.

    The count sits in the ASGI ``receive`` channel, below Starlette: its form parser would otherwise spool a
    whole multipart upload to disk before any size check ran.
    """
    from starlette.requests import Request

    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestError(413, "body_too_large", f"the request body is larger than {limit} bytes")
        return message

    return Request(request.scope, receive)


def parse_json(body: bytes, settings: ServeSpec, takes_question: bool) -> Query:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    except RecursionError:  # nesting deeper than the interpreter's recursion limit
        raise RequestError(400, "invalid_json", "the body nests JSON arrays or objects too deeply") from None
    if not isinstance(fields, dict):
        raise RequestError(400, "invalid_json", f"expected a JSON object with {', '.join(FIELDS)}, "
                           f"got {type(fields).__name__}")
    _check_field_names(fields)
    image = fields.get("image")
    if image is None:
        raise RequestError(400, "missing_field", 'the field "image" (a base64-encoded image) is required',
                           field="image")
    if not isinstance(image, str):
        raise _wrong_type("image", "a base64 string", image)
    query = _query(decode_base64(image, settings), fields.get("question"), fields.get("attention", False),
                   settings, takes_question)
    return _with_model(query, fields.get("model", ""))


def parse_form(form: Any, settings: ServeSpec, takes_question: bool) -> Query:
    """``form``: Starlette's ``FormData`` (files are ``UploadFile``-like, with ``.file``)."""
    _check_field_names(form)
    image = form.get("image")
    if image is None:
        raise RequestError(400, "missing_field", 'the form field "image" (an image file) is required', field="image")
    if isinstance(image, str):
        raise _wrong_type("image", "a file upload", image)
    data = image.file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise _too_large(settings)
    attention = form.get("attention", "false")
    if attention not in ("true", "false", "1", "0"):
        raise _wrong_type("attention", '"true" or "false"', attention)
    question = form.get("question")
    if question is not None and not isinstance(question, str):
        raise _wrong_type("question", "a text field", question)
    return _with_model(_query(data, question, attention in ("true", "1"), settings, takes_question),
                       form.get("model", ""))


def _with_model(query: Query, model: Any) -> Query:
    if not isinstance(model, str) or not is_utf8_text(model):
        raise _wrong_type("model", "an adapter name (GET /v1/models lists them)", model)
    query.model = model
    return query


def decode_base64(text: str, settings: ServeSpec) -> bytes:
    if text.startswith("data:"):  # a data URL: data:image/png;base64,<payload>
        text = text.partition(",")[2]
    if len(text) > settings.max_image_bytes * 4 // 3 + 4:
        raise _too_large(settings)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", 'the field "image" is not valid base64', field="image") from None


def check_image(data: bytes, settings: ServeSpec) -> None:
    """Size limits and "is this an image at all", from the header only (no pixel is decoded here)."""
    if len(data) > settings.max_image_bytes:
        raise _too_large(settings)
    if not data:
        raise RequestError(400, "not_an_image", "the image is empty", field="image")
    size, pixels = _dicom_size(data) if is_dicom(data) else _image_size(data)
    if pixels > settings.max_image_pixels:
        raise RequestError(413, "image_too_large", f"the image is {size} pixels; at most "
                           f"{settings.max_image_pixels} pixels (width × height) are accepted", field="image")


def _image_size(data: bytes) -> tuple[str, int]:
    """("W×H", pixels) from the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
                width, height = image.size
                return f"{width}×{height}", width * height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, "image_too_large", "the image has too many pixels to decode safely",
                           field="image") from None
    except Exception:  # PIL raises many types for what it cannot identify
        raise RequestError(400, "not_an_image", "the image is not a PNG, JPEG or DICOM file", field="image") from None


def _dicom_size(data: bytes) -> tuple[str, int]:
    """("F frames × S samples × W×H", pixels): every frame and colour sample counts, as it would when decoded."""
    try:
        import pydicom

        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        width, height = int(header.Columns), int(header.Rows)
        frames, samples = int(header.get("NumberOfFrames") or 1), int(header.get("SamplesPerPixel") or 1)
    except Exception:
        raise RequestError(400, "not_an_image", "the DICOM file has no readable image header", field="image") from None
    if min(width, height, frames, samples) < 1:
        raise RequestError(400, "not_an_image", "the DICOM header gives an empty image", field="image")
    return f"{frames} frame(s) × {samples} sample(s) × {width}×{height}", frames * samples * width * height


def _query(data: bytes, question: Any, attention: Any, settings: ServeSpec, takes_question: bool) -> Query:
    if not isinstance(attention, bool):
        raise _wrong_type("attention", "true or false", attention)
    if takes_question:
        if question is None:
            raise RequestError(400, "missing_field", 'the field "question" is required by this VQA model',
                               field="question")
        if not isinstance(question, str):
            raise _wrong_type("question", "a string", question)
        if not is_utf8_text(question):
            raise RequestError(400, "invalid_text", 'the field "question" is not valid UTF-8 text (it holds a lone '
                               "surrogate, e.g. an unpaired \\ud800 escape)", field="question")
        if not question.strip():
            raise RequestError(400, "empty_question", 'the field "question" is empty', field="question")
        if len(question) > settings.max_question_chars:
            raise RequestError(413, "question_too_long", f"the question has {len(question)} characters; at most "
                               f"{settings.max_question_chars} are accepted", field="question")
    elif question is not None:
        raise RequestError(400, "question_not_supported", "this model does not answer questions: send the image "
                           "alone", field="question")
    check_image(data, settings)
    return Query(data, question or "", attention)


def is_utf8_text(text: str) -> bool:
    """False for strings UTF-8 cannot encode: JSON's ``\\ud800`` escapes and ``surrogatepass`` bytes decode to them,
    and the tokenizer would fail on them inside a batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_field_names(fields: Any) -> None:
    unknown = sorted(set(fields.keys()) - set(FIELDS))
    if unknown:
        raise RequestError(400, "unknown_field", f"unknown field(s) {', '.join(map(ascii, unknown))}; expected "
                           f"{', '.join(FIELDS)}", field=ascii(unknown[0])[1:-1])  # the answer must encode as UTF-8


def _wrong_type(name: str, expected: str, value: Any) -> RequestError:
    got = "null" if value is None else type(value).__name__
    return RequestError(400, "wrong_type", f'the field "{name}" must be {expected}, got {got}', field=name)


def _too_large(settings: ServeSpec) -> RequestError:
    return RequestError(413, "image_too_large", f"the image is larger than {settings.max_image_bytes} bytes",
                        field="image")
