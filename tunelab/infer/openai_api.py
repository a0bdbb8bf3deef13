"""OpenAI request validation and response bodies (no HTTP here; `server.py` is the transport).

A malformed request raises `ApiError` with an HTTP status and an OpenAI-style error body,
so the server answers 4xx and never crashes. Fields we do not implement but clients send with
neutral values (``presence_penalty: 0``, ``logprobs: false``) are accepted; non-neutral values
are rejected with a message, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.infer.sampling import GenerationConfig

MAX_N = 16
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """A request error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class ParsedRequest:
    """A validated request: prompts (text, messages or ids) and one config per choice."""

    kind: str  # "chat" | "completion"
    prompts: list[Any]  # chat: [messages]; completion: str or list[int] each
    config: GenerationConfig
    max_tokens_given: bool
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    tools: list | None = None
    extra: dict = field(default_factory=dict)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _get_int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ApiError(f"'{key}' must be an integer{rng}, got {v!r}", param=key)
    return v


def _get_num(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ApiError(f"'{key}' must be a number in {left}{lo}, {hi}], got {v!r}", param=key)
    return float(v)


def _get_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {v!r}", param=key)
    return v


def _reject_unsupported(body: dict) -> None:
    for key in ("presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v not in (None, 0, 0.0):
            raise ApiError(
                f"'{key}' is not supported by this server; use 'repetition_penalty' instead",
                param=key,
            )
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise ApiError("'logprobs' is not supported by this server", param="logprobs")
    if body.get("logit_bias"):
        raise ApiError("'logit_bias' is not supported by this server", param="logit_bias")
    if body.get("suffix"):
        raise ApiError("'suffix' is not supported by this server", param="suffix")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") in (None, "text")):
        raise ApiError(
            "only response_format {'type': 'text'} is supported", param="response_format"
        )
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError("'best_of' is not supported (use 'n')", param="best_of")


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or any(not isinstance(s, str) or not s for s in stop)
    ):
        raise ApiError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
            "non-empty strings",
            param="stop",
        )
    return stop


def _sampling(body: dict, defaults: GenerationConfig, max_tokens_key: str) -> tuple:
    max_tokens = _get_int(body, max_tokens_key, lo=1)
    if max_tokens is None and max_tokens_key == "max_completion_tokens":
        max_tokens = _get_int(body, "max_tokens", lo=1)
    temperature = _get_num(body, "temperature", 0.0, 2.0)
    top_p = _get_num(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _get_int(body, "top_k", lo=-1)
    penalty = _get_num(body, "repetition_penalty", 0.0, 10.0, lo_open=True)
    seed = _get_int(body, "seed")
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else max(top_k, 0),
        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty,
        seed=seed,
        stop=_stop_list(body),
        ignore_eos=_get_bool(body, "ignore_eos"),
    )
    try:
        return GenerationConfig(**kwargs), max_tokens is not None
    except ConfigError as e:
        raise ApiError(str(e)) from e


def _common(body: Any) -> tuple[int, bool, bool]:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    _reject_unsupported(body)
    n = _get_int(body, "n", lo=1, hi=MAX_N) or 1
    stream = _get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    return n, stream, include_usage


def _message_text(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(
                    f"messages[{i}].content: only text parts are supported", param="messages"
                )
            if not isinstance(part.get("text"), str):
                raise ApiError(f"messages[{i}].content: a text part needs 'text'", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"messages[{i}].content must be a string or a list of parts", param="messages")


def parse_chat(body: Any, defaults: GenerationConfig) -> ParsedRequest:
    n, stream, include_usage = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES:
            raise ApiError(
                f"messages[{i}] must be an object with 'role' in {list(CHAT_ROLES)}",
                param="messages",
            )
        clean.append({"role": msg["role"], "content": _message_text(msg, i)})
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError("'tools' must be a list", param="tools")
    config, given = _sampling(body, defaults, "max_completion_tokens")
    return ParsedRequest(
        "chat", [clean], config, given, n, stream, include_usage, tools=tools or None
    )


def parse_completion(body: Any, defaults: GenerationConfig) -> ParsedRequest:
    n, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) for p in prompt)
        or isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
    ):
        prompts = list(prompt)
    else:
        raise ApiError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids (non-empty)",
            param="prompt",
        )
    if len(prompts) * n > MAX_N * 4:
        raise ApiError(f"too many choices: len(prompt) * n must be <= {MAX_N * 4}", param="n")
    # OpenAI's default for completions is 16 new tokens.
    config, given = _sampling(body, defaults.replace(max_new_tokens=16), "max_tokens")
    echo = _get_bool(body, "echo")
    return ParsedRequest("completion", prompts, config, given, n, stream, include_usage, echo)


# ---------------------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def stream_chunk(
    kind: str,
    rid: str,
    model: str,
    index: int,
    text: str | None,
    finish_reason: str | None,
    first: bool = False,
    include_usage: bool = False,
) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {
            "index": index,
            "text": text or "",
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        obj = "text_completion"
    chunk = {"id": rid, "object": obj, "created": now(), "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(kind: str, rid: str, model: str, use: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [], "usage": use}


def models_response(model: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "tunelab"}],
    }
