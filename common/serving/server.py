"""An OpenAI-compatible HTTP server around any engine with add_request/step/abort_request (cycle 4 on).

    python -m cycle4_batching.serve HuggingFaceTB/SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with
`stream`: server-sent events ending in `data: [DONE]`), GET /metrics (Prometheus text).

The handlers never touch the engine: common/serving/engine_loop.py's thread owns it. A handler parses and
checks the JSON (pydantic), builds SamplingParams (their own checks), then hands the engine loop a
function that tokenizes the prompt and adds it; the engine's own validation runs there, before
anything is queued, and its ValueError comes back as a 400. Errors are OpenAI-shaped:
{"error": {"message", "type", "code"}}.
"""

import argparse
import dataclasses
import importlib
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.serving.engine_loop import EngineError, EngineLoop

DEFAULT_MAX_TOKENS = 16        # OpenAI's default for completions; chat uses what is left of the context


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")   # unknown OpenAI fields (user, logit_bias, ...) are ignored
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # vLLM's extension; 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False        # vLLM's extension, used by benchmarks
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None   # vLLM's extension, e.g. {"enable_thinking": false}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        self.status, self.message, self.type = status, message, type_


def error_response(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


def build_app(llm, engine_module, served_model_name: str) -> FastAPI:
    """The FastAPI app for one engine; its lifespan starts and stops the engine loop."""
    engine = EngineLoop(llm)
    max_model_len = llm.source.config.max_position_embeddings
    has_template = bool(getattr(llm.tokenizer, "chat_template", None))
    if not has_template:
        print(f"note: {served_model_name} has no chat template: chat messages are joined as plain text", file=sys.stderr)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vllm-learn", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(400, f"invalid request: {details}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine loop is not running", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "vllm-learn", "root": llm.source.name,
                                            "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.snapshot, served_model_name))

    def sampling_params(body: _SamplingFields, max_tokens: int | None):
        if body.model != served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {served_model_name!r}",
                           "not_found_error")
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request (n=1)")
        try:
            return engine_module.SamplingParams(
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
                ignore_eos=body.ignore_eos, stop=body.stop)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error))

    async def submit(build):
        try:
            return await engine.add(build)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        params = sampling_params(body, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"got {len(prompt)} prompts: this server takes one prompt per request")
            prompt = prompt[0]

        def build(llm):
            ids = prompt if isinstance(prompt, list) else llm.tokenizer(prompt).input_ids
            return ids, params

        request_id, prompt_tokens, outputs = await submit(build)
        response = _Response(f"cmpl-{uuid.uuid4().hex}", served_model_name, chat=False)
        if body.stream:
            return _stream(engine, request_id, prompt_tokens, outputs, response, body)
        return await _collect(engine, request_id, prompt_tokens, outputs, response)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if not body.messages:
            raise APIError(400, "messages is empty")
        messages = [m.model_dump() for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens if max_tokens is not None else 1)  # checked now

        def build(llm):
            ids = chat_prompt_ids(llm.tokenizer, messages, has_template, body.chat_template_kwargs or {})
            if max_tokens is not None:
                return ids, params
            # As vLLM: what is left of the context (and of the KV pool, which must hold it all).
            pool = llm.block_manager.num_blocks * llm.block_manager.block_size
            return ids, dataclasses.replace(params, max_tokens=max(1, min(max_model_len, pool) - len(ids)))

        request_id, prompt_tokens, outputs = await submit(build)
        response = _Response(f"chatcmpl-{uuid.uuid4().hex}", served_model_name, chat=True)
        if body.stream:
            return _stream(engine, request_id, prompt_tokens, outputs, response, body)
        return await _collect(engine, request_id, prompt_tokens, outputs, response)

    return app


def chat_prompt_ids(tokenizer, messages: list[dict], has_template: bool, template_kwargs: dict | None = None) -> list[int]:
    """The chat rendered with the tokenizer's template, encoded without adding special tokens again
    (the template has its own). Without a template the contents are joined as plain text."""
    if has_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer("\n\n".join(m["content"] for m in messages) + "\n").input_ids


class _Response:
    """The pieces every response and chunk of one request share."""

    def __init__(self, response_id: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())

    def envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, text: str, finish_reason: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _next(outputs):
    out = await outputs.get()
    if isinstance(out, EngineError):
        raise APIError(500, str(out), "server_error")
    return out


async def _collect(engine: EngineLoop, request_id: int, prompt_tokens: int, outputs, response: _Response):
    """A non-streamed response: wait for the finished output. Were the handler cancelled, abort."""
    finished = False
    try:
        while True:
            out = await _next(outputs)
            if out.finished:
                finished = True
                break
    finally:
        if not finished:
            engine.abort(request_id)
    return {**response.envelope(chunk=False), "choices": [response.choice(out.text, out.finish_reason, chunk=False)],
            "usage": _usage(prompt_tokens, len(out.token_ids))}


def _stream(engine: EngineLoop, request_id: int, prompt_tokens: int, outputs, response: _Response, body):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(data: dict) -> str:
        if include_usage:
            data.setdefault("usage", None)
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        finished, first, completion_tokens = False, True, 0
        try:
            while not finished:
                try:
                    out = await _next(outputs)
                except APIError as error:
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': error.status}})}\n\n"
                    finished = True   # the engine loop dropped the request already
                    break
                finished = out.finished
                completion_tokens += len(out.new_token_ids)
                choice = response.choice(out.delta_text, out.finish_reason if finished else None, chunk=True, first=first)
                first = False
                yield sse({**response.envelope(chunk=True), "choices": [choice]})
            if include_usage:
                yield sse({**response.envelope(chunk=True), "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:   # the client went away mid-stream: free its blocks now
                engine.abort(request_id)

    return StreamingResponse(events(), media_type="text/event-stream")


def prometheus_text(snapshot: dict, model: str) -> str:
    """The engine snapshot in Prometheus' text format, under vLLM's metric names."""
    rows = [("num_requests_running", "gauge", "Requests in the running batch."),
            ("num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full)."),
            ("prompt_tokens_total", "counter", "Prompt tokens of the requests added."),
            ("generation_tokens_total", "counter", "Tokens generated.")]
    lines = []
    for name, kind, help_text in rows:
        lines += [f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} {kind}",
                  f'vllm:{name}{{model_name="{model}"}} {snapshot[name]}']
    return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name without the vllm: prefix: value}, for tests and benchmarks."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0].removeprefix("vllm:")] = float(value)
    return values


def build_parser(package: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {package}.serve",
                                description=f"An OpenAI-compatible server for {package}.")
    p.add_argument("model", help="HF id or local directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL as given)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the requests that bring none")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option, e.g. --option max_num_seqs=8 (repeatable)")
    return p


def main(package: str, argv: list[str] | None = None) -> None:
    import uvicorn

    from common.engine.cli import parse_options

    args = build_parser(package).parse_args(argv)
    module = importlib.import_module(package)
    options: dict[str, Any] = parse_options(args.option)
    try:
        llm = module.LLM(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                         seed=args.seed, **options)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}")
    print(f"{package}: {llm.source.name} ({llm.source.weights} weights) on {llm.device}, "
          f"serving as {args.served_model_name or args.model!r} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(build_app(llm, module, args.served_model_name or args.model), host=args.host, port=args.port,
                log_level="info")
