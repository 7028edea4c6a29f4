"""The Serve deployment: one model behind FastAPI routes, its generation batched with ``@serve.batch``.

Routes (all answers are JSON; errors are ``{"error": {"code", "message", ...}}``, 4xx for a refused request):

* ``POST /v1/<endpoint>``: the recipe's endpoint (``caption``, ``report`` or ``vqa``; see ``Recipe.endpoint``).
  Another endpoint answers 404 naming the one this model serves.
* ``GET /v1/model``: what is loaded, named without the server's paths (see :func:`model_identity`).
  ``GET /healthz``: 200 while the model works, 503 once it failed a probe (the deployment's ``check_health``,
  which makes Serve replace the replica); never behind the API key.

Requests are validated one by one (:mod:`medvl.serve.requests`) before they join a batch; the batch is decoded
and generated in one call by :class:`medvl.serve.runner.ModelRunner` (one query's failure fails only that
query), in a worker thread so that the replica keeps accepting (and refusing) requests while the model runs.
A streaming chat completion is the exception: it is generated alone, outside the batches, so that its tokens can
leave while it runs (see :meth:`MedvlServer.chat_completions`).

``GET /v1/models`` also says which replica answered and what it loaded (``replica``: its id and
:meth:`ModelRunner.stats`): the base model once per replica, adapters as Serve's LRU asks.
"""
# No `from __future__ import annotations` here: Serve's ingress rebuilds the route methods' signatures in its own
# module, where FastAPI could not resolve "Request" from a string annotation.
import asyncio
import logging
import math
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi import Path as PathParameter
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from medvl.models.cache import remote_name
from medvl.models.lora import adapter_base, is_adapter_folder
from medvl.runs import MODEL_DIR
from medvl.serve.auth import authorized, check_digest
from medvl.serve.config import DEPLOYMENT_NAME, deployment_options
from medvl.serve.openai_api import chat_completion, read_chat_request, streamed_chunks
from medvl.serve.requests import OPENAPI_EXTRA, OPENAPI_RESPONSES, Query, RequestError, read_query
from medvl.serve.runner import ModelDead, ModelRunner
from medvl.spec import JobSpec, parse_spec
from medvl.storage import is_remote

logger = logging.getLogger("ray.serve")
api = FastAPI(title="medvl", docs_url=None, redoc_url=None)


@api.exception_handler(RequestError)
async def refused(request: Request, error: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method, malformed multipart) in the same JSON shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
    return JSONResponse({"error": {"code": code, "message": str(error.detail)}}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


@api.exception_handler(Exception)
async def failed(request: Request, error: Exception) -> JSONResponse:
    """A bug or a model failure: JSON like the rest (Starlette still re-raises it, so the replica's log has it)."""
    return JSONResponse({"error": {"code": "internal_error", "message": f"the server failed on this request "
                                   f"({type(error).__name__}); see the replica's log"}}, status_code=500)


def public_model_name(location: str, output_dir: str) -> str:
    """A model folder or hub id as clients see it: a hub id as is; a folder under the spec's ``output_dir`` by its
    path there without the final ``model/`` (``train``, ``stage2``, ``tune/best``); any other folder by its own
    name, or its parent's when it is called ``model``. Where the files lie on the server is nobody else's business.
    """
    if is_remote(location):
        return _public_url_name(location, output_dir)
    path = Path(location)
    if not path.exists() and location.count("/") <= 1 and not location.startswith((".", "/", "~")):
        return location  # a hub id
    path = path.absolute()
    try:
        parts = list(path.relative_to(Path(output_dir).absolute()).parts)
    except ValueError:  # outside output_dir
        parts = [path.parent.name] if path.name == MODEL_DIR else [path.name]
    if len(parts) > 1 and parts[-1] == MODEL_DIR:
        parts.pop()
    return "/".join(parts) or path.name


def _public_url_name(url: str, output_dir: str) -> str:
    """A model folder on object storage named like a local one: its path under output_dir, else its own name."""
    parts = url.rstrip("/").split("/")
    prefix = output_dir.rstrip("/") + "/"
    if url.startswith(prefix):
        parts = url[len(prefix):].strip("/").split("/")
    elif parts[-1] == MODEL_DIR:
        parts = parts[-2:]
    else:
        parts = parts[-1:]
    if len(parts) > 1 and parts[-1] == MODEL_DIR:
        parts.pop()
    return "/".join(parts)


def model_identity(spec: JobSpec, checkpoint: str, local_checkpoint: str | None = None) -> dict:
    """``model``: the served folder (see :func:`public_model_name`); ``base_model``: what it was trained from (a
    peft adapter's recorded base, else ``model.name_or_path``; null for a preset's random weights).
    ``local_checkpoint``: where the replica loaded a checkpoint on object storage from (its cached copy)."""
    local = local_checkpoint or checkpoint
    if is_adapter_folder(local):
        recorded = adapter_base(local)
        base: str | None = public_model_name(remote_name(recorded) or recorded, spec.output_dir)
    elif spec.model.preset:
        base = None
    else:
        base = public_model_name(spec.model.name_or_path, spec.output_dir)
    return {"model": public_model_name(checkpoint, spec.output_dir), "recipe": spec.model.recipe,
            "base_model": base, "preset": spec.model.preset}


class LoadedAdapter:
    """What Serve's multiplexing keeps per adapter; Serve calls ``__del__`` when it evicts the adapter."""

    def __init__(self, runner: ModelRunner, name: str):
        self.runner, self.name = runner, name

    def __del__(self) -> None:
        self.runner.unload_adapter(self.name)


# @serve.ingress copies the class by value while this module is still importing: the module-level names its
# methods use must be defined above it.
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class MedvlServer:
    def __init__(self, args: dict):
        spec = parse_spec(args["spec"])
        self.settings = spec.serve
        self.spec = spec
        self.key_digest = args.get("api_key_hmac", "")
        torch.set_num_threads(max(1, math.ceil(self.settings.num_cpus)))
        self.runner = ModelRunner(spec, args["checkpoint"], args.get("adapters") or None)
        self.identity = model_identity(spec, self.runner.checkpoint, self.runner.local_checkpoint)
        self.max_adapters = self.settings.max_adapters_per_replica
        self._generating: set[asyncio.Future] = set()  # streaming generations in flight
        self.recipe, self.generation = self.runner.recipe, self.runner.generation
        self.infer.set_max_batch_size(self.settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        logger.info("medvl: %s model from %s on %s, POST /v1/%s, batches of up to %d", spec.model.recipe,
                    self.runner.checkpoint, self.runner.device, self.recipe.endpoint, self.settings.max_batch_size)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        replica = serve.get_replica_context().replica_id.unique_id
        try:
            await self.check_health()
        except ModelDead as dead:
            return JSONResponse({"status": "unhealthy", "reason": str(dead), "replica": replica}, status_code=503)
        return JSONResponse({"status": "ok", "replica": replica})

    async def check_health(self) -> None:
        """Ray Serve calls this every few seconds and replaces the replica when it raises (see ModelRunner)."""
        await asyncio.to_thread(self.runner.check_health)

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> dict:
        self.authorize(request)
        settings, generation = self.settings, self.generation
        return {
            **self.identity,
            "task": self.recipe.task,
            "endpoint": f"/v1/{self.recipe.endpoint}",
            "takes_question": self.takes_question,
            "device": str(self.runner.device),
            "image_size": self.spec.data.image_size,
            "num_beams": generation.num_beams,
            "max_new_tokens": generation.max_new_tokens,
            "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "api_key_required": bool(self.key_digest),
        }

    @api.post("/v1/{endpoint}", openapi_extra=OPENAPI_EXTRA, responses=OPENAPI_RESPONSES)
    async def answer(self, request: Request,
                     endpoint: str = PathParameter(examples=["caption", "report", "vqa"])) -> dict:
        started = time.perf_counter()
        self.authorize(request)
        if endpoint != self.recipe.endpoint:
            raise RequestError(404, "unsupported_endpoint",
                               f"this model ({self.spec.model.recipe}) answers POST /v1/{self.recipe.endpoint}, "
                               f"not /v1/{endpoint}", supported=f"/v1/{self.recipe.endpoint}")
        query = await read_query(request, self.settings, self.takes_question)
        query.model = self.adapter_for(query.model)
        result = await self.infer(query)
        if isinstance(result, RequestError):
            raise result
        result.pop("token_ends", None)
        return {**result, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """OpenAI's model list, with each adapter's searched values and validation metric; ``replica``: the
        replica that answered, and what it loaded (:meth:`ModelRunner.stats`)."""
        self.authorize(request)
        replica = {"id": serve.get_replica_context().replica_id.unique_id, **self.runner.stats()}
        if not self.runner.adapters:
            return {"object": "list", "replica": replica, "data": [
                {"id": self.identity["model"], "object": "model", "owned_by": "medvl",
                 "base_model": self.identity["base_model"]}]}
        return {"object": "list", "replica": replica, "data": [
            {"id": name, "object": "model", "owned_by": "medvl", "base_model": self.identity["base_model"],
             "searched": a["config"], "metric": a["metric"], "value": a["value"],
             "loaded_here": name in self.runner.resident}
            for name, a in self.runner.adapters.items()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI's chat completions: the image as an ``image_url`` content part, the question as text.

        ``stream: true`` bypasses the ``@serve.batch`` path: the request is generated on its own (under the
        runner's model lock, so between batches) with a streamer, and each token's text is sent as it is
        generated. Streaming trades batching for latency to the first token."""
        self.authorize(request)
        chat = await read_chat_request(request, self.settings, self.takes_question)
        name = self.adapter_for(chat.query.model or chat.model)
        chat.query.model = name
        if chat.stream:
            return await self.stream_chat(chat.query, name, chat.max_tokens)
        result = await self.infer(chat.query)
        if isinstance(result, RequestError):
            raise result
        return chat_completion(result, name, chat.max_tokens)

    async def stream_chat(self, query: Query, name: str, max_tokens: int | None) -> StreamingResponse:
        """Generate in a worker thread whose streamer posts each piece of text to a queue the response reads.
        The response starts once the first piece (or the whole answer) is there, so a refused query still gets
        its 4xx JSON instead of a broken stream."""
        if name:
            await self.use_adapter(name)
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

        def post(kind: str, value) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        def generate() -> None:
            try:
                answer = self.runner.stream(name, query, lambda text: post("piece", text), max_tokens)
                post("done", {**answer, "model": name} if isinstance(answer, dict) and name else answer)
            except Exception as error:  # handed to the request, which raises it
                post("done", error)

        worker = asyncio.ensure_future(asyncio.to_thread(generate))
        self._generating.add(worker)  # a reference keeps the task alive until it is done
        worker.add_done_callback(self._generating.discard)
        first = await pieces.get()
        if first[0] == "done" and isinstance(first[1], Exception):
            raise first[1]
        return StreamingResponse(streamed_chunks(first, pieces, name, max_tokens), media_type="text/event-stream")

    def adapter_for(self, asked: str) -> str:
        """The adapter a request names (body "model", else the serve_multiplexed_model_id header), or the
        first; 404 naming the available ones for another name."""
        asked = asked or serve.get_multiplexed_model_id()
        if not self.runner.adapters:
            if asked and asked != self.identity["model"]:
                raise RequestError(404, "unknown_model", f"no model {asked!r} here; available: "
                                   f"{self.identity['model']}", available=[self.identity["model"]])
            return ""
        if not asked:
            return next(iter(self.runner.adapters))
        if asked not in self.runner.adapters:
            available = list(self.runner.adapters)
            raise RequestError(404, "unknown_model", f"no adapter {asked!r}; available: {', '.join(available)}",
                               available=available)
        return asked

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, name: str) -> LoadedAdapter:
        """Serve's LRU over adapters: loads one here, and unloads it (``__del__``) when it is evicted."""
        await asyncio.to_thread(self.runner.load_adapter, name)
        return LoadedAdapter(self.runner, name)

    async def use_adapter(self, name: str) -> None:
        await self.get_adapter(name)
        # The decorator's limit is fixed where the class is defined; the spec's goes on the wrapper Serve made.
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None:
            wrapper.max_num_models_per_replica = self.max_adapters

    @property
    def takes_question(self) -> bool:
        return self.runner.takes_question

    def authorize(self, request: Request) -> None:
        if not authorized(request.headers, self.key_digest):
            raise RequestError(401, "unauthorized", "a valid API key is required: send it as "
                               "'Authorization: Bearer <key>' or 'X-API-Key: <key>'")

    # The real limits are set in __init__ from the spec (set_max_batch_size / set_batch_wait_timeout_s).
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, queries: list[Query]) -> list[dict | RequestError]:
        if not self.runner.adapters:
            return await asyncio.to_thread(self.runner.answer, queries)
        # One adapter at a time: group the batch by adapter, keep each answer in its query's place.
        answers: list = [None] * len(queries)
        for name in dict.fromkeys(q.model for q in queries):
            places = [i for i, q in enumerate(queries) if q.model == name]
            await self.use_adapter(name)
            group = await asyncio.to_thread(self.runner.answer_with, name, [queries[i] for i in places])
            for i, answer in zip(places, group):
                answers[i] = {**answer, "model": name} if isinstance(answer, dict) else answer
        return answers


def build_app(args: dict) -> Application:
    """The application builder named in the Serve config file (``import_path``); ``args``: see config.app_args."""
    settings = parse_spec(args["spec"]).serve
    if "api_key_sha256" in args or args.get("api_key_hmac"):  # an older config's key must not be dropped silently
        check_digest(args.get("api_key_hmac") or args["api_key_sha256"])
    return MedvlServer.options(**deployment_options(settings)).bind(args)
