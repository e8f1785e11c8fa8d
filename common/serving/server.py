"""An OpenAI-compatible HTTP server in front of an engine client (cycle 4 on).

    python -m cycle4_batching.serve HuggingFaceTB/SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with
`stream`: server-sent events ending in `data: [DONE]`), POST /tokenize, POST /detokenize, GET
/metrics (Prometheus text, vLLM's names).

The front end does everything but the engine's steps: it parses and checks the request
(common/serving/openai_protocol.py: which fields are honoured and which are refused, and why),
renders chat templates in a sandbox (chat_template.py), tokenizes, builds SamplingParams
(sampling.py), then hands token ids to the engine client and turns the deltas that come back into
OpenAI's responses. So a bad request, a template that raises or a prompt that does not fit fails
that request alone, with a 400 before the engine sees anything; if the engine itself fails, the
requests in flight get an error, /health answers 503, later requests get 503 at once, and main()
exits with a non-zero status.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from common.engine.args import add_model_args, parse_options
from common.engine.cli import refuse_unknown_options
from common.serving.chat_template import chat_prompt_ids
from common.serving.engine_client import EngineCoreClient, EngineError, InProcessEngine
from common.serving.metrics import RequestTimer, ServerMetrics, parse_metrics  # noqa: F401  (parse_metrics: re-exported)
from common.serving.middleware import ApiKey, BodyLimit
from common.serving.openai_protocol import (REFUSED_CHAT, REFUSED_COMPLETIONS, APIError, ChatRequest,
                                            CompletionRequest, DetokenizeRequest, TokenizeRequest, check_fields,
                                            normalize_prompts, unknown_fields)
from common.serving.logprobs import LogprobsForm, completion_logprobs
from common.serving.openai_responses import Reply, echo_only, sse, usage
from common.serving.sampling import NEUTRAL, build_sampling_params, default_max_tokens, unusable_defaults
from common.serving.template_worker import TemplateWorker
from common.serving.workers import WorkerPool

MAX_BODY_BYTES = 16 * 2**20      # a 100k-token prompt as JSON token ids is under 1 MiB
RETRY_AFTER_S = 1
MAX_REQUEST_TOKENS = 2**18       # prompt tokens of one request, all its prompts together
MAX_UNKNOWN_RECORDED = 256       # unknown field names remembered (each logged once); past that, none


@dataclass
class ServerOptions:
    served_model_name: str
    generation_defaults: dict = field(default_factory=lambda: dict(NEUTRAL))
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_waiting_requests: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    trust_request_chat_template: bool = False


class OpenAIServer:
    """What the handlers share: the engine client, the options, the metrics."""

    def __init__(self, engine, options: ServerOptions):
        self.engine, self.options = engine, options
        # As vLLM: the longest sequence served is what both the model and the KV pool can hold.
        self.max_model_len = min(engine.max_model_len, getattr(engine, "kv_pool_tokens", engine.max_model_len))
        self.metrics = ServerMetrics(options.served_model_name)
        self.num_waiting = 0                  # added to the engine, no token yet (--max-waiting-requests)
        self._unknown_logged: set[str] = set()   # at most MAX_UNKNOWN_RECORDED names
        self.workers = WorkerPool()              # tokenizing, templates, decoding: off the event loop
        self.templates = TemplateWorker()        # clients' chat templates, under limits

    # --- checks shared by the endpoints ----------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                           f"{self.options.served_model_name!r}", "not_found_error", param="model")

    def check_request(self, body, table: dict) -> None:
        self.check_model(body.model)
        check_fields(body, table, self.engine.sampling_params_cls)
        new = [n for n in unknown_fields(body, table) if n not in self._unknown_logged]
        room = MAX_UNKNOWN_RECORDED - len(self._unknown_logged)
        if new and room > 0:      # one line per request at most; a bounded record of names
            self._unknown_logged.update(new[:room])
            shown = ", ".join(repr(n[:40]) for n in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            print(f"note: request fields unknown to this server are ignored (each logged once): {shown}",
                  file=sys.stderr)

    def check_vocab(self, ids: list[int], param: str, index: int = 0) -> None:
        vocab = self.engine.vocab_size
        if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
            raise APIError(400, f"prompt {index} holds token id {bad}, outside the vocabulary [0, {vocab})", param=param)

    def check_fits(self, ids: list[int], max_tokens: int, param: str, index: int = 0) -> None:
        limit = self.max_model_len
        self.check_vocab(ids, param, index)
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; prompt {index} has "
                           f"{len(ids)} and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all)",
                           param="max_tokens" if len(ids) < limit else param)

    def decode_token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        """In a worker thread (`self.workers.run`): a long prompt takes seconds."""
        if isinstance(prompt, list):
            return prompt
        _check_text(prompt, "prompt")
        ids = self.engine.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        if not ids:
            raise APIError(400, "the prompt tokenizes to no tokens", param="prompt")
        return ids

    def tokenize_all(self, prompts: list, add_special_tokens: bool) -> list[list[int]]:
        ids, total = [], 0
        for prompt in prompts:
            ids.append(self.tokenize(prompt, add_special_tokens))
            total += len(ids[-1])
            if total > MAX_REQUEST_TOKENS:
                raise APIError(400, f"the prompts of one request may hold at most {MAX_REQUEST_TOKENS} tokens "
                               "in all", param="prompt")
        return ids

    def chat_ids(self, body) -> list[int]:
        """The chat rendered and tokenized (in a worker thread); a client's template in the
        template worker, under its time, memory and size limits."""
        return chat_prompt_ids(self.engine.tokenizer, body.messages, add_special_tokens=bool(body.add_special_tokens),
                               template=body.chat_template, kwargs=body.chat_template_kwargs,
                               add_generation_prompt=body.add_generation_prompt is not False,
                               continue_final_message=bool(body.continue_final_message), worker=self.templates)

    # --- the engine -------------------------------------------------------------------------------

    async def submit(self, prompts: list[list[int]], params) -> list:
        """Add every prompt to the engine, all or none: a refusal aborts those already added."""
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        limit = self.options.max_waiting_requests
        if limit is not None and self.num_waiting + len(prompts) > limit:
            raise APIError(429, f"{self.num_waiting} requests are waiting (--max-waiting-requests {limit}); "
                           "retry later", "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        streams = []
        try:
            for ids in prompts:
                streams.append(await self.engine.add(ids, params))
        except (ValueError, TypeError) as error:
            self._abort(streams)
            raise APIError(400, str(error), param="prompt" if len(prompts) > 1 else None) from None
        except EngineError as error:
            self._abort(streams)
            raise self._engine_error(error) from None
        except BaseException:
            self._abort(streams)
            raise
        self.num_waiting += len(streams)
        return streams

    def _engine_error(self, error: EngineError) -> APIError:
        """503 once the engine is dead (a step raised, its core or a tensor-parallel worker died: the
        server exits next), 500 for a failure of one request's own."""
        dead = not self.engine.alive
        return APIError(503 if dead else 500, f"the engine {'is not running' if dead else 'failed'}: {error}",
                        "server_error")

    def _abort(self, streams) -> None:
        for stream in streams:
            self.engine.abort(stream.request_id)

    async def deltas(self, flight: "_Flight"):
        """(choice index, delta) of every stream of a request as they come, with the metrics kept;
        whatever has not finished when this ends (the client left, the engine failed) is aborted."""
        try:
            async with contextlib.aclosing(_merge(flight.streams)) as merged:
                async for i, delta in merged:
                    flight.on_delta(i, delta)
                    yield i, delta
        except EngineError:
            flight.close("error")
            raise
        finally:
            flight.close("abort")

    # --- the endpoints ------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        self.check_request(body, REFUSED_COMPLETIONS)
        prompts = normalize_prompts(body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else \
            default_max_tokens(body, self.options.generation_defaults, False, 0)
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        # max_tokens 0 with echo (lm-eval's scoring form): one token is generated for the prompt's
        # logprobs, and dropped from the answer.
        generated = 1 if max_tokens == 0 else max_tokens      # a negative one is the table's 400
        params = build_sampling_params(body, self.options.generation_defaults, self.engine.sampling_params_cls,
                                       generated)
        ids = await self.workers.run(self.tokenize_all, prompts, body.add_special_tokens is not False)
        positions = 0 if max_tokens == 0 and body.logprobs is None else generated   # echo alone: none
        for index, prompt_ids in enumerate(ids):
            self.check_fits(prompt_ids, positions, "prompt", index)
        echoes = await self.workers.run(self.echo_texts, prompts, ids) if body.echo else None
        reply = Reply(f"cmpl-{uuid.uuid4().hex}", self.options.served_model_name, chat=False, echoes=echoes)
        if body.logprobs is not None:
            reply.logprobs = LogprobsForm(self.decode_token, chat=False, top=body.logprobs,
                                          prompts=ids if body.echo else None)
        if max_tokens == 0:
            scored = None if body.logprobs is None else await self.workers.run(
                self.prompt_only_logprobs, ids, await self.prompt_logprobs(ids, params))
            return echo_only(reply, body, [len(i) for i in ids], scored)
        streams = await self.submit(ids, params)
        return await self.respond(request, body, streams, reply, arrival)

    def echo_texts(self, prompts: list, ids: list[list[int]]) -> list[str]:
        return [p if isinstance(p, str) else self.engine.tokenizer.decode(i) for p, i in zip(prompts, ids)]

    async def prompt_logprobs(self, ids: list[list[int]], params) -> list:
        """The prompts' logprobs, from a one-token generation of each (its token is not returned)."""
        flight = _Flight(self, await self.submit(ids, params), time.perf_counter())
        found = [None] * len(ids)
        try:
            async for i, delta in self.deltas(flight):
                found[i] = delta.prompt_logprobs or found[i]
        except EngineError as error:
            raise self._engine_error(error) from None
        return found

    def prompt_only_logprobs(self, ids: list[list[int]], prompt_logprobs: list) -> list[dict]:
        return [completion_logprobs(p, lp, self.decode_token) for p, lp in zip(ids, prompt_logprobs)]

    async def chat(self, body: ChatRequest, request: Request):
        arrival = time.perf_counter()
        self.check_request(body, REFUSED_CHAT)
        if body.chat_template is not None and not self.options.trust_request_chat_template:
            raise APIError(400, "chat_template in a request runs the client's code on the server: start the "
                           "server with --trust-request-chat-template to allow it", param="chat_template")
        ids = await self.workers.run(self.chat_ids, body)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = self.max_model_len - len(ids)
        max_tokens = requested if requested is not None else \
            default_max_tokens(body, self.options.generation_defaults, True, max(room, 1))
        params = build_sampling_params(body, self.options.generation_defaults, self.engine.sampling_params_cls,
                                       max_tokens)
        self.check_fits(ids, max_tokens, "messages")
        reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", self.options.served_model_name, chat=True)
        if body.logprobs:
            reply.logprobs = LogprobsForm(self.decode_token, chat=True, top=body.top_logprobs or 0)
        streams = await self.submit([ids], params)
        return await self.respond(request, body, streams, reply, arrival)

    async def respond(self, request: Request, body, streams, reply: Reply, arrival: float):
        flight = _Flight(self, streams, arrival)
        if body.stream:
            return _FlightResponse(self.events(flight, reply, body), flight)
        work = asyncio.ensure_future(self.collect(flight, reply))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():          # the client left (or the server stops): abort its requests
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            flight.close("abort")
        if work.cancelled():
            return Response(status_code=499)
        return work.result()

    async def collect(self, flight: "_Flight", reply: Reply) -> dict:
        streams = flight.streams
        n = len(streams)
        texts, reasons, tokens = [""] * n, [None] * n, [0] * n
        ids, logprobs, prompt_logprobs = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        try:
            async for i, delta in self.deltas(flight):
                texts[i] += delta.delta_text
                tokens[i] += len(delta.new_token_ids)
                reasons[i] = delta.finish_reason if delta.finished else None
                if reply.logprobs is not None:
                    ids[i] += delta.new_token_ids
                    logprobs[i] += delta.logprobs          # this delta's tokens' (engine_client.Delta)
                    prompt_logprobs[i] = delta.prompt_logprobs or prompt_logprobs[i]   # the first delta's
        except EngineError as error:
            raise self._engine_error(error) from None
        choices = [reply.choice(i, text, reason, chunk=False) for i, (text, reason) in enumerate(zip(texts, reasons))]
        if reply.logprobs is not None:
            for i, choice in enumerate(choices):
                choice["logprobs"] = reply.logprobs.format(i, ids[i], logprobs[i], prompt_logprobs[i])
        totals = usage(sum(s.num_prompt_tokens for s in streams), sum(tokens))
        return {**reply.envelope(chunk=False), "choices": choices, "usage": totals}

    async def events(self, flight: "_Flight", reply: Reply, body):
        """The SSE stream: one chunk per delta (with its choice index), a usage chunk if asked, [DONE]."""
        options = body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        prompt_tokens, completion_tokens = sum(s.num_prompt_tokens for s in flight.streams), 0
        started, sent = set(), {}      # sent: characters of each choice's text streamed so far
        try:
            async for i, delta in self.deltas(flight):
                completion_tokens += len(delta.new_token_ids)
                choice = reply.choice(i, delta.delta_text, delta.finish_reason if delta.finished else None,
                                      chunk=True, first=i not in started)
                if reply.logprobs is not None:
                    choice["logprobs"] = reply.logprobs.format(i, delta.new_token_ids, delta.logprobs,
                                                               delta.prompt_logprobs, text_offset=sent.get(i, 0))
                    sent[i] = sent.get(i, 0) + len(choice.get("text", ""))
                started.add(i)
                chunk = {**reply.envelope(chunk=True), "choices": [choice]}
                if include_usage or continuous:
                    chunk["usage"] = usage(prompt_tokens, completion_tokens) if continuous else None
                yield sse(chunk)
        except EngineError as error:
            yield sse(self._engine_error(error).body())
        if include_usage:
            yield sse({**reply.envelope(chunk=True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    async def tokenize_endpoint(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            if body.chat_template is not None and not self.options.trust_request_chat_template:
                raise APIError(400, "chat_template needs --trust-request-chat-template", param="chat_template")
            ids = await self.workers.run(self.chat_ids, body)
        else:
            ids = await self.workers.run(self.tokenize_all, [body.prompt], body.add_special_tokens is not False)
            ids = ids[0]
        strs = await self.workers.run(self.engine.tokenizer.convert_ids_to_tokens, ids) \
            if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize_endpoint(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        vocab = self.engine.vocab_size
        if (bad := next((t for t in body.tokens if not 0 <= t < vocab), None)) is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        if len(body.tokens) > MAX_REQUEST_TOKENS:
            raise APIError(400, f"at most {MAX_REQUEST_TOKENS} tokens per request", param="tokens")
        return {"prompt": await self.workers.run(self.engine.tokenizer.decode, body.tokens)}


def _check_text(text: str, param: str) -> None:
    """A string the tokenizer can take: UTF-8 encodable (JSON may carry a lone surrogate, "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(400, f"{param} is not valid Unicode text: {error.reason} at character {error.start}",
                       param=param) from None


class _Flight:
    """The engine requests of one HTTP request, from submit to their end. close() is idempotent and
    is called on every way out (finished, client gone before or during the stream, engine failed),
    so no request stays in the engine and the waiting count stays exact."""

    def __init__(self, server: OpenAIServer, streams: list, arrival: float):
        self.server, self.streams = server, streams
        self.timers = [RequestTimer(s.num_prompt_tokens, arrival) for s in streams]

    def on_delta(self, i: int, delta) -> None:
        if self.timers[i].last_token is None:
            self.server.num_waiting -= 1
        self.server.metrics.on_delta(self.timers[i], delta)

    def close(self, reason: str) -> None:
        for stream, timer in zip(self.streams, self.timers):
            if timer.ended:
                continue
            if timer.last_token is None:
                self.server.num_waiting -= 1
            if reason == "abort":
                self.server.engine.abort(stream.request_id)
            self.server.metrics.on_end(timer, reason)


class _FlightResponse(StreamingResponse):
    """A streamed response that closes its flight however it ends, even when the client left
    before the first chunk (the event generator then never starts, so its own finally never runs)."""

    def __init__(self, content, flight: _Flight):
        super().__init__(content, media_type="text/event-stream")
        self.flight = flight

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.flight.close("abort")


async def _merge(streams):
    """(index, delta) from several streams, in arrival order; one stream is read directly."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for delta in stream:
                await queue.put((i, delta, None))
        except Exception as error:  # noqa: BLE001  (handed to the reader, which raises it)
            await queue.put((i, None, error))
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield i, delta
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- the app ----------------------------------------------------------------------------------------

def build_app(engine, options: ServerOptions | str) -> FastAPI:
    """The FastAPI app around one engine client; its lifespan starts and stops the engine.
    `options` may be just the served model name."""
    if isinstance(options, str):
        options = ServerOptions(served_model_name=options)
    server = OpenAIServer(engine, options)
    if not getattr(engine.tokenizer, "chat_template", None):
        print(f"note: {options.served_model_name} has no chat template: chat messages are joined as plain text",
              file=sys.stderr)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()
        server.workers.shutdown()
        server.templates.close()

    app = FastAPI(title="vllm-learn", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app)
    _add_routes(app, server)
    _add_middleware(app, options)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        where = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
        details = "; ".join(f"{w or 'body'}: {e.get('msg')}" for w, e in zip(where, errors))
        return JSONResponse(APIError(400, f"invalid request: {details}", param=where[0] or None if where else None)
                            .body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    engine, options = server.engine, server.options

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(APIError(503, "the engine is not running", "server_error").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "vllm-learn", "root": engine.model_name,
                                            "max_model_len": server.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(engine.snapshot))

    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    app.post("/tokenize")(server.tokenize_endpoint)
    app.post("/detokenize")(server.detokenize_endpoint)


def _add_middleware(app: FastAPI, options: ServerOptions) -> None:
    """Added last runs first: CORS (answers preflights), then the API key, then the body limit."""
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    if options.api_keys:
        app.add_middleware(ApiKey, keys=options.api_keys)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])


# --- the command line ---------------------------------------------------------------------------------

def build_parser(package: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {package}.serve",
                                description=f"An OpenAI-compatible server for {package}.")
    add_model_args(p, model_positional=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL as given)")
    p.add_argument("--seed", type=int, default=None, help="seed of the requests that bring none")
    p.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="sampling defaults: the model's generation_config.json (auto) or the neutral ones (vllm)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health and /metrics "
                        "(repeatable; default: $VLLM_API_KEY)")
    p.add_argument("--allowed-origins", default=None,
                   help='CORS origins, a JSON list or commas: \'["https://a.example"]\' (default: none)')
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="past this many requests waiting for their first token, answer 429 (default: no bound)")
    p.add_argument("--max-request-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow a chat_template in requests (it runs on the server, sandboxed)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core in a process of its own (default), or in a thread of the server")
    p.add_argument("--profile-dir", default=None,
                   help="write cProfile stats of the front end (front_end.prof) and the core (core.prof) here at exit")
    return p


def parse_origins(value: str | None) -> list[str]:
    if not value:
        return []
    origins = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
    return [o.strip() for o in origins if o.strip()]


def server_options(args, generation_defaults: dict) -> ServerOptions:
    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if k]
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise SystemExit("error: --max-waiting-requests must be >= 1")
    return ServerOptions(served_model_name=args.served_model_name or args.model,
                         generation_defaults=generation_defaults, api_keys=keys,
                         allowed_origins=parse_origins(args.allowed_origins),
                         max_waiting_requests=args.max_waiting_requests,
                         max_body_bytes=args.max_request_body_bytes,
                         trust_request_chat_template=args.trust_request_chat_template)


EXIT_GRACE_S = 3               # seconds uvicorn may take to close connections when it stops


def make_engine(package: str, args, options: dict, core_profile: str | None = None):
    """The engine client: the core in a process of its own (default) or in a thread of this one."""
    refuse_unknown_options(package, options)       # before any process starts or weight loads
    options = dict(device=args.device, dtype=args.dtype, weights=args.weights, seed=args.seed, **options)
    if args.engine_process:
        engine = EngineCoreClient(package, args.model, options, profile_path=core_profile)
    else:
        engine = InProcessEngine(importlib.import_module(package).LLM(args.model, **options), core_profile)
    where = f"engine core in process {engine.pid}" if args.engine_process else "engine core in a thread of this process"
    print(f"{package}: {engine.source.name} ({engine.source.weights} weights), {where}", file=sys.stderr)
    return engine, engine.source.path


def main(package: str, argv: list[str] | None = None) -> None:
    import cProfile
    import threading

    import uvicorn

    from common.serving.sampling import generation_defaults

    args = build_parser(package).parse_args(argv)
    profile_dir = args.profile_dir
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
    try:
        engine, model_dir = make_engine(package, args, parse_options(args.option),
                                        os.path.join(profile_dir, "core.prof") if profile_dir else None)
        defaults = generation_defaults(model_dir, args.generation_config)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}")
    for name in unusable_defaults(defaults, engine.sampling_params_cls):
        print(f"FALLBACK: generation_config.json sets {name}={defaults[name]}, which this engine cannot apply: "
              f"served without it", file=sys.stderr)
    options = server_options(args, defaults)
    print(f"serving {options.served_model_name!r} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, options), host=args.host, port=args.port,
                                           log_level="info", timeout_graceful_shutdown=EXIT_GRACE_S))

    def exit_soon(reason):
        """The engine is dead: stop serving (every stream has had its error) and exit non-zero, as
        vLLM's server does. Should a connection keep uvicorn from stopping, the process exits anyway."""
        server.should_exit = True
        threading.Timer(2 * EXIT_GRACE_S, os._exit, args=(1,)).start()

    engine.on_dead = exit_soon
    profiler = cProfile.Profile() if profile_dir else None   # the front end: the event loop's thread
    try:
        profiler.runcall(server.run) if profiler else server.run()
    except KeyboardInterrupt:     # Ctrl+C: uvicorn has shut down cleanly and re-raises it
        pass
    finally:
        if profiler:
            profiler.dump_stats(os.path.join(profile_dir, "front_end.prof"))
    if not engine.alive:
        raise SystemExit(f"error: the engine died: {engine.dead_reason}")
