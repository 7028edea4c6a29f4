"""OpenAI-compatible chat completions over the same model: ``POST /v1/chat/completions``.

The request is OpenAI's: ``messages`` whose user content holds the image as an ``image_url`` part (a ``data:`` URL
or bare base64; no remote URLs: the server fetches nothing) and, for VQA models, the question as a ``text`` part;
``model`` names the adapter (``GET /v1/models``); ``max_tokens`` cuts the answer after that many generated tokens;
``temperature`` (0–2, OpenAI's semantics): absent or 0 answers with the deployment's deterministic decoding (greedy
or beam search, ``serve.num_beams``: reproducible), > 0 samples at that temperature (one beam, no top-k / top-p
cut). It controls only the decoding: the model's calibration temperature (``calibration.json``) still rescales the
confidence reported, which is the model's own probability of the tokens it chose, whatever the dice. ``seed`` (an
integer, OpenAI's best-effort determinism): a sampled request with the same seed, model, image and question gets the
same text again, whatever other requests ran before or beside it (its own generator: see
:mod:`medvl.models.scored_generation`); at temperature 0 it changes nothing (the decoding is deterministic already).

``stream: true`` answers as server-sent events: the role, then the text as it is generated (one chunk per token's
new text), then a last chunk with the finish reason and medvl's fields, then ``data: [DONE]``. A streaming request
does not join a ``@serve.batch`` batch: it is generated alone, with a streamer, so its first chunk leaves after the
first token (see :meth:`medvl.serve.app.MedvlServer.chat_completions`). Beam search cannot stream (the winning beam
is known only at the end): under ``serve.num_beams`` > 1 and ``temperature`` 0 the chunks follow the generation.

The answer's ``choices[0].message.content`` is the text; medvl's own fields (``mean_token_prob``, ``findings``,
``warnings``) ride along under ``medvl``.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from medvl.serve.requests import (Query, RequestError, _query, capped, check_content_length, decode_base64,
                                  max_body_bytes)
from medvl.spec import ServeSpec

MEDVL_FIELDS = ("mean_token_prob", "findings", "warnings", "model")


@dataclass
class ChatRequest:
    query: Query
    model: str
    stream: bool
    max_tokens: int | None


async def read_chat_request(request: Any, settings: ServeSpec, takes_question: bool) -> ChatRequest:
    check_content_length(request.headers.get("content-length"), settings)
    return parse_chat(await capped(request, max_body_bytes(settings)).body(), settings, takes_question)


def parse_chat(body: bytes, settings: ServeSpec, takes_question: bool) -> ChatRequest:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RequestError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("messages"), list) or not fields["messages"]:
        raise RequestError(400, "missing_field", 'expected a JSON object with a non-empty "messages" list',
                           field="messages")
    image, texts = None, []
    for message in fields["messages"]:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue  # system / assistant turns carry nothing this model reads
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(400, "wrong_type", "a message's content must be a string or a list of parts",
                               field="content")
        for part in parts:
            if not isinstance(part, dict):
                raise RequestError(400, "wrong_type", "a content part must be an object", field="content")
            if part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(400, "wrong_type", "image_url.url must be a data: URL or base64",
                                       field="image_url")
                image = url
            elif part.get("type") == "text" and isinstance(part.get("text"), str) and part["text"].strip():
                texts.append(part["text"])
    if image is None:
        raise RequestError(400, "missing_field", "a user message needs an image_url content part (a data: URL)",
                           field="image_url")
    if image.startswith(("http://", "https://")):
        raise RequestError(400, "remote_image", "send the image inline (data: URL or base64); the server fetches "
                           "no URLs", field="image_url")
    question = " ".join(texts) if takes_question else None
    query = _query(decode_base64(image, settings), question, False, settings, takes_question)
    model = fields.get("model", "")
    if not isinstance(model, str):
        raise RequestError(400, "wrong_type", '"model" must be a string', field="model")
    max_tokens = fields.get("max_tokens", fields.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise RequestError(400, "wrong_type", '"max_tokens" must be a positive integer', field="max_tokens")
    temperature = fields.get("temperature", 0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError(400, "wrong_type", '"temperature" must be a number from 0 to 2', field="temperature")
    seed = fields.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(400, "wrong_type", '"seed" must be an integer', field="seed")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "wrong_type", '"stream" must be true or false', field="stream")
    query.model, query.temperature, query.seed = model, float(temperature), seed
    return ChatRequest(query, model, stream, max_tokens)


def token_pieces(result: dict, max_tokens: int | None = None) -> list[str]:
    """The answer's text cut at its tokens' ends (``token_ends``), at most ``max_tokens`` of them."""
    text, ends = result["text"], result.get("token_ends") or [len(result["text"])]
    pieces, start = [], 0
    for end in ends[:max_tokens]:
        end = min(end, len(text))
        if end > start:
            pieces.append(text[start:end])
            start = end
    if max_tokens is None and start < len(text):
        pieces.append(text[start:])
    return pieces


def chat_completion(result: dict, model: str, max_tokens: int | None = None) -> dict:
    pieces = token_pieces(result, max_tokens)
    truncated = max_tokens is not None and len(result.get("token_ends") or []) > max_tokens
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model or "medvl",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                     "finish_reason": "length" if truncated else "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(pieces), "total_tokens": len(pieces)},
        "medvl": {k: result[k] for k in MEDVL_FIELDS if k in result},
    }


async def streamed_chunks(first: tuple[str, Any], pieces: asyncio.Queue, model: str,
                          max_tokens: int | None = None) -> AsyncIterator[str]:
    """Server-sent events of an answer being generated: ``first``, then what ``pieces`` receives:
    ``("piece", text)`` while the model generates, then ``("done", answer or exception)``. Whatever of the final
    text was not streamed live (all of it under beam search) follows as one chunk per token before the finish; a
    failure after the stream began ends it with an ``error`` event (the status line was already sent)."""
    events = ChunkEvents(model)
    yield events.role()
    sent, (kind, value) = "", first
    while kind == "piece":
        sent += value
        yield events.content(value)
        kind, value = await pieces.get()
    if isinstance(value, Exception):
        body = value.body() if isinstance(value, RequestError) else {"error": {
            "code": "internal_error", "message": f"the server failed on this request ({type(value).__name__})"}}
        yield f"data: {json.dumps(body)}\n\n"
        return
    rest = token_pieces(value, max_tokens)
    if sent:  # the live pieces are a prefix of the final text (see PieceStreamer); send what they left out
        text = "".join(rest)
        rest = [text[len(sent):]] if text.startswith(sent) and len(text) > len(sent) else []
    for piece in rest:
        yield events.content(piece)
    for event in events.finish(value, max_tokens):
        yield event


class ChunkEvents:
    """One streamed completion's ``chat.completion.chunk`` events (one id and creation time for all)."""

    def __init__(self, model: str):
        self.model = model or "medvl"
        self.ident, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(self, delta: dict, finish: str | None = None, **extra: Any) -> str:
        chunk = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def role(self) -> str:
        return self.event({"role": "assistant", "content": ""})

    def content(self, piece: str) -> str:
        return self.event({"content": piece})

    def finish(self, result: dict, max_tokens: int | None) -> Iterator[str]:
        truncated = max_tokens is not None and len(result.get("token_ends") or []) > max_tokens
        yield self.event({}, "length" if truncated else "stop",
                         medvl={k: result[k] for k in MEDVL_FIELDS if k in result})
        yield "data: [DONE]\n\n"
