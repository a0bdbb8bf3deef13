"""`tunelab serve`: an OpenAI-compatible HTTP server (stdlib only).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
with ``"stream": true`` as server-sent events), ``GET /health``. Handler threads parse and
tokenize; one `BatchWorker` thread owns the model and batches whatever is waiting. Every bad
request gets an OpenAI-style JSON error with a 4xx status; an unexpected failure a 500 — the
server itself keeps running.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tunelab.errors import TunelabError
from tunelab.infer import openai_api as api
from tunelab.infer.engine import ContextLengthError, Engine
from tunelab.infer.worker import BatchWorker, Job, is_final

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server plus the engine worker; `close()` stops both."""

    # Handler threads are joined on close; open keep-alive connections are shut down first,
    # so nothing of ours is left running when the interpreter exits.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        model_name: str | None = None,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.01,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.engine = engine
        self.api_key = api_key or None
        self.model_name = model_name or engine.name
        self.created = int(time.time())
        self.worker = BatchWorker(engine, max_batch_size, batch_wait_s).start()
        self.tokenizer_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request_thread(self, request, client_address) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self, serving: bool = True) -> None:
        """Stop accepting, cancel running generations, end open connections, join threads.

        ``serving=False`` when `serve_forever` already returned (e.g. after Ctrl-C).
        """
        if serving:
            self.shutdown()
        self.worker.stop()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------ plumbing
    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: api.ApiError) -> None:
        # An unread request body would corrupt the next request on a kept-alive connection.
        self._send_json(err.status, err.body(), close=not getattr(self, "_body_read", True))

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if hmac.compare_digest(given.encode(), key.encode()):
            return True
        self._send_error(
            api.ApiError(
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )
        )
        return False

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise api.ApiError("chunked request bodies are not supported; send Content-Length")
        try:
            n = int(length or 0)
        except ValueError as e:
            raise api.ApiError("bad Content-Length header") from e
        if n > MAX_BODY_BYTES:
            raise api.ApiError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(n) if n > 0 else b""
        self._body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise api.ApiError(f"the request body is not valid JSON: {e}") from e

    # ------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok"})
            return
        if not self._authorized():
            return
        if path == "/v1/models":
            self._send_json(200, api.models_response(self.server.model_name, self.server.created))
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name != self.server.model_name:
                self._model_not_found(name)
                return
            self._send_json(200, api.models_response(name, self.server.created)["data"][0])
        elif path in ("/v1/chat/completions", "/v1/completions"):
            self._send_error(api.ApiError(f"use POST for {path}", status=405))
        else:
            self._send_error(api.ApiError(f"unknown path {path!r}", status=404, code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        self._body_read = False
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise api.ApiError(f"unknown path {path!r}", status=404, code="not_found")
            if not self._authorized():
                return
            body = self._read_json()
            self._complete(path, body)
        except api.ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s went away", self.address_string())
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("internal error on %s", path)
            try:
                self._send_error(api.ApiError("internal server error", 500, type_="server_error"))
            except OSError:
                pass

    def _method_not_allowed(self) -> None:
        self._body_read = False
        self._send_error(api.ApiError(f"method {self.command} is not allowed here", status=405))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815 - http.server naming

    def _model_not_found(self, name: str) -> None:
        self._send_error(
            api.ApiError(
                f"the model {name!r} does not exist; this server serves "
                f"{self.server.model_name!r} (see GET /v1/models)",
                status=404,
                param="model",
                code="model_not_found",
            )
        )

    # ------------------------------------------------------------ completions
    def _tokenize(self, req: api.ParsedRequest) -> list[list[int]]:
        engine = self.server.engine
        with self.server.tokenizer_lock:
            if req.kind == "chat":
                if not engine.uses_template:
                    raise api.ApiError(
                        "this server was started without a chat template; restart it with "
                        "--prompt-type NAME or --hf-chat-template, or use /v1/completions"
                    )
                return [engine.encode_chat(m, tools=req.tools) for m in req.prompts]
            return [p if isinstance(p, list) else engine.encode_text(p) for p in req.prompts]

    def _complete(self, path: str, body: Any) -> None:
        server, engine = self.server, self.server.engine
        kind = "chat" if path.endswith("chat/completions") else "completion"
        parse = api.parse_chat if kind == "chat" else api.parse_completion
        if isinstance(body, dict):
            model = body.get("model")
            if model is not None and model != server.model_name:
                self._model_not_found(str(model))
                return
        req = parse(body, engine.defaults)
        try:
            prompts = self._tokenize(req)
            jobs: list[Job] = []
            out: queue.Queue = queue.Queue()
            for p_i, ids in enumerate(prompts):
                engine.check_prompt(
                    ids, req.config.max_new_tokens if req.max_tokens_given else None
                )
                for k in range(req.n):
                    seed = None if req.config.seed is None else req.config.seed + k
                    cfg = req.config.replace(seed=seed)
                    if not req.max_tokens_given and kind == "chat":
                        cfg = cfg.replace(max_new_tokens=engine.context_len - len(ids))
                    jobs.append(Job(ids, cfg, out, choice=p_i * req.n + k))
        except ContextLengthError as e:
            raise api.ApiError(str(e), param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded") from e  # fmt: skip
        except TunelabError as e:
            raise api.ApiError(str(e)) from e
        echo = [engine.decode(prompts[j.choice // req.n]) if req.echo else "" for j in jobs]
        num_prompt = sum(len(j.prompt_ids) for j in jobs[:: req.n])
        rid = api.new_id(kind)
        server.worker.submit(jobs)
        try:
            if req.stream:
                self._stream(kind, rid, req, jobs, out, echo, num_prompt)
            else:
                self._collect(kind, rid, jobs, out, echo, num_prompt)
        finally:
            for j in jobs:  # a client that left stops its rows at the next decode step
                j.cancel.set()

    def _events(self, jobs: list[Job], out: queue.Queue):
        pending = len(jobs)
        while pending:
            choice, ev = out.get()
            if isinstance(ev, Exception):
                raise ev
            if is_final(ev):
                pending -= 1
            yield choice, ev

    def _collect(self, kind, rid, jobs, out, echo, num_prompt) -> None:
        texts = list(echo)
        reasons = ["length"] * len(jobs)
        num_completion = 0
        for choice, ev in self._events(jobs, out):
            texts[choice] += ev.text
            num_completion += ev.token_id is not None
            if ev.finish_reason:
                reasons[choice] = "stop" if ev.finish_reason == "cancelled" else ev.finish_reason
        build = api.chat_response if kind == "chat" else api.completion_response
        use = api.usage(num_prompt, num_completion)
        self._send_json(200, build(rid, self.server.model_name, list(zip(texts, reasons)), use))

    def _stream(self, kind, rid, req, jobs, out, echo, num_prompt) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        model = self.server.model_name

        def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        inc = req.include_usage
        for job in jobs:
            if kind == "chat" or echo[job.choice]:
                first_text = "" if kind == "chat" else echo[job.choice]
                send(api.stream_chunk(kind, rid, model, job.choice, first_text, None, True, inc))
        num_completion = 0
        try:
            for choice, ev in self._events(jobs, out):
                num_completion += ev.token_id is not None
                reason = ev.finish_reason
                if reason == "cancelled":
                    reason = "stop"
                if ev.text:
                    send(api.stream_chunk(kind, rid, model, choice, ev.text, None, False, inc))
                if reason:
                    text = None if kind == "chat" else ""
                    send(api.stream_chunk(kind, rid, model, choice, text, reason, False, inc))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            log.exception("generation failed while streaming")
            err = (
                e
                if isinstance(e, api.ApiError)
                else api.ApiError(str(e), 500, type_="server_error")
            )
            send(err.body())
            return
        if inc:
            send(api.usage_chunk(kind, rid, model, api.usage(num_prompt, num_completion)))
        send("[DONE]")


# ---------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from tunelab.infer.options import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 to accept other hosts)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the "
                        "model directory's name)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="most requests decoded together (default 16)")  # fmt: skip
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long an idle engine waits for more requests to batch (default 10)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from tunelab.infer.options import engine_from_args

    if args.max_batch_size < 1:
        raise TunelabError("--max-batch-size must be >= 1")
    engine = engine_from_args(args, max_batch_size=args.max_batch_size)
    server = OpenAIServer(
        engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000.0,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    print(f"tunelab serve: {server.model_name!r} on {server.url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close(serving=False)
    return 0
