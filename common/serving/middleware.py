"""Access and limits, as plain ASGI middleware (Starlette's BaseHTTPMiddleware would buffer
streams and hide a client's disconnect from the handlers, which must see it to abort).

- ApiKey: with `--api-key` (or VLLM_API_KEY), every request needs `Authorization: Bearer KEY`,
  else 401, except /health (a load balancer's probe) and /metrics (a scraper's, which computes
  nothing from the request: our choice; vLLM guards /v1 only). /tokenize and /detokenize need the
  key too, unlike vLLM: they tokenize, render templates and decode, which is work a stranger
  could make the server do.
- BodyLimit: a request body over the limit gets 413, whether it announces its length
  (Content-Length) or sends it in chunks, before any of it is parsed.
"""

import hmac
import json

OPEN_PATHS = ("/health", "/metrics")


async def _send_error(send, status: int, message: str, type_: str) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKey:
    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    def _allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # compare_digest on every key: the time taken says nothing about which prefix matched
        return scheme.lower() == "bearer" and any([hmac.compare_digest(token.encode("latin-1"), k) for k in self.keys])

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope.get("method") != "OPTIONS"
                and scope["path"] not in OPEN_PATHS and not self._allowed(scope)):
            await _send_error(send, 401, "a valid API key is required: Authorization: Bearer KEY",
                              "authentication_error")
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads the whole body first (the handlers read it all anyway), refusing it past the limit,
    then hands the app a receive that replays it and afterwards passes the client's messages on
    (so a handler still hears `http.disconnect`)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":      # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        await _send_error(send, 413, f"the request body is over {self.max_bytes} bytes", "invalid_request_error")
