"""Prompt templates by MindSpeed-LLM ``--prompt-type`` name, and the tokenizer's own chat_template.

A template turns a ``Conversation`` into (source, target) turn pairs of *elements*: text pieces
and special tokens, each tokenized on its own (as MindSpeed and LLaMA-Factory do) so that a
template string never merges with the content next to it. The table lives in
``templates.json``; ``docs/data-formats.md`` lists the slots of each name.

Inference renders prompts through the same code so chat and training never drift:
``render_generation_prompt`` and ``stop_token_ids`` at the end of this module (they use the
encoder in ``encode.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from tunelab.data.formats import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    USER,
    Conversation,
    Message,
)
from tunelab.errors import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
_THOUGHT_RE = re.compile(r"<think>.*?</think>\s*", re.DOTALL)

# Element = ("text" | "const", str) | ("token", name) | ("bos",) | ("eos",)
Element = tuple


@dataclass
class Template:
    name: str
    user: list
    assistant: list
    system: list
    observation: list
    function: list
    separator: list = field(default_factory=list)
    prefix: list = field(default_factory=list)
    default_system: str = ""
    stop_words: list[str] = field(default_factory=list)
    replace_eos: bool = False
    efficient_eos: bool = False
    kind: str = "default"  # default | llama2 | reasoning
    tool_format: str = "default"
    end_of_turn: str | None = None

    @staticmethod
    def from_dict(name: str, d: dict) -> Template:
        efficient = bool(d.get("efficient_eos", False))
        assistant = d.get("assistant") or (
            ["{{content}}"] if efficient else ["{{content}}", {"special": "eos"}]
        )
        user = d["user"]
        return Template(
            name=name,
            user=user,
            assistant=assistant,
            system=d.get("system") or ["{{content}}"],
            observation=d.get("observation") or user,
            function=d.get("function") or assistant,
            separator=d.get("separator", []),
            prefix=d.get("prefix", []),
            default_system=d.get("default_system", ""),
            stop_words=list(d.get("stop_words", [])),
            replace_eos=bool(d.get("replace_eos", False)),
            efficient_eos=efficient,
            kind=d.get("kind", "default"),
            tool_format=d.get("tool_format", "default"),
            end_of_turn=d.get("end_of_turn"),
        )

    # ---- slots -> elements ---------------------------------------------------------------
    @staticmethod
    def apply(slots: list, content: str = "", idx: int = 0) -> list[Element]:
        out: list[Element] = []
        for slot in slots:
            if isinstance(slot, str):
                # "const" pieces hold no data and are cached by the encoder.
                kind = "text" if "{{content}}" in slot or "{{idx}}" in slot else "const"
                text = slot.replace("{{content}}", content).replace("{{idx}}", str(idx))
                if text:
                    out.append((kind, text))
            elif "token" in slot:
                out.append(("token", slot["token"]))
            elif slot.get("special") == "bos":
                out.append(("bos",))
            elif slot.get("special") == "eos":
                out.append(("eos",))
            else:  # pragma: no cover - the table is ours
                raise AssertionError(f"bad slot {slot!r} in template")
        return out

    def _tool_text(self, tools: str) -> str:
        if not tools:
            return ""
        try:
            parsed = json.loads(tools)
        except json.JSONDecodeError:
            parsed = None
        items = parsed if isinstance(parsed, list) else [parsed] if parsed else None
        if self.tool_format == "qwen":
            body = "\n".join(json.dumps(t, ensure_ascii=False) for t in items) if items else tools
            return (
                "\n\n# Tools\n\nYou may call one or more functions to assist with the user "
                "query.\n\nYou are provided with function signatures within <tools></tools> "
                f"XML tags:\n<tools>\n{body}\n</tools>\n\nFor each function call, return a json "
                "object with function name and arguments within <tool_call></tool_call> XML "
                'tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                "<args-json-object>}\n</tool_call>"
            )
        body = json.dumps(items, ensure_ascii=False) if items else tools
        return f"\n\nYou have access to the following tools:\n{body}"

    def _function_text(self, content: str) -> str:
        """A function_call turn's JSON {"name", "arguments"} in the template's call syntax."""
        try:
            call = json.loads(content)
        except json.JSONDecodeError:
            return content
        calls = call if isinstance(call, list) else [call]
        if not all(isinstance(c, dict) and "name" in c for c in calls):
            return content
        if self.tool_format == "qwen":
            return "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["name"], "arguments": c.get("arguments", {})}, ensure_ascii=False
                )
                + "\n</tool_call>"
                for c in calls
            )
        return "\n".join(
            f"Action: {c['name']}\nAction Input: "
            + json.dumps(c.get("arguments", {}), ensure_ascii=False)
            for c in calls
        )

    # ---- conversation -> pairs -----------------------------------------------------------
    def render(
        self, conv: Conversation, enable_thinking: bool | None = None
    ) -> list[tuple[list[Element], list[Element], Message]]:
        """(source elements, target elements, target message) for each turn pair."""
        messages = list(conv.messages)
        system = conv.system or self.default_system
        tool_text = self._tool_text(conv.tools)
        if self.kind == "reasoning" and enable_thinking is False:
            # Thoughts of earlier answers are dropped, as the model never sees them again.
            messages = [
                Message(m.role, _THOUGHT_RE.sub("", m.content), m.train)
                if m.role == ASSISTANT and i < len(messages) - 1
                else m
                for i, m in enumerate(messages)
            ]
        encoded: list[list[Element]] = []
        for i, m in enumerate(messages):
            els: list[Element] = []
            content = m.content
            if i == 0:
                els += self.apply(self.prefix)
                if (system or tool_text) and self.kind != "llama2":
                    els += self.apply(self.system, system + tool_text)
            if i > 0 and i % 2 == 0:
                els += self.apply(self.separator)
            if m.role == USER:
                if i == 0 and self.kind == "llama2" and (system or tool_text):
                    sys_text = "".join(
                        e[1]
                        for e in self.apply(self.system, system + tool_text)
                        if e[0] in ("text", "const")
                    )
                    content = sys_text + content
                els += self.apply(self.user, content, idx=i // 2)
            elif m.role == OBSERVATION:
                els += self.apply(self.observation, content, idx=i // 2)
            elif m.role == FUNCTION:
                els += self.apply(self.function, self._function_text(content))
            else:
                els += self.apply(self.assistant, content)
            encoded.append(els)
        pairs = []
        for i in range(0, len(messages) - 1, 2):
            src, tgt, ans = encoded[i], encoded[i + 1], messages[i + 1]
            if self.kind == "reasoning" and not (
                THINK_OPEN in ans.content or THINK_CLOSE in ans.content
            ):
                if enable_thinking:
                    tgt = [("const", EMPTY_THOUGHT), *tgt]
                else:
                    src = [*src, ("const", EMPTY_THOUGHT)]
            pairs.append((src, tgt, ans))
        return pairs

    def eos_token(self, tokenizer) -> str | None:
        """The token that ends an answer: the first stop word when the template replaces eos."""
        if self.replace_eos and self.stop_words:
            return self.stop_words[0]
        return tokenizer.eos_token


@cache
def _table() -> dict[str, dict]:
    text = resources.files("tunelab.data").joinpath("templates.json").read_text("utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def template_names() -> list[str]:
    return sorted(_table())


def get_template(name: str) -> Template:
    table = _table()
    if name not in table:
        raise ConfigError(
            f"unknown --prompt-type {name!r}; choose one of: {', '.join(sorted(table))}"
        )
    return Template.from_dict(name, table[name])


def token_id(tokenizer, token: str, template: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ConfigError(
            f"--prompt-type {template} needs the token {token!r}, which the tokenizer does not "
            "have; use the prompt type of your model family or --hf-chat-template"
        )
    return int(tid)


def stop_token_ids(
    tokenizer, prompt_type: str | None = None, hf_chat_template: bool = False
) -> list[int]:
    """Token ids that end generation: the tokenizer's eos plus the template's end-of-turn tokens.

    With ``hf_chat_template`` the end-of-turn tokens are the known ones (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...) that the tokenizer has and its chat_template uses.
    """
    ids: list[int] = []
    if prompt_type:
        tpl = get_template(prompt_type)
        eos = tpl.eos_token(tokenizer)
        words = ([eos] if eos else []) + tpl.stop_words
        if tpl.end_of_turn:
            words.append(tpl.end_of_turn)
        ids += [token_id(tokenizer, w, prompt_type) for w in words]
    elif hf_chat_template:
        chat = tokenizer.chat_template or ""
        for word in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>"):
            tid = tokenizer.convert_tokens_to_ids(word)
            if word in chat and tid is not None and tid != tokenizer.unk_token_id:
                ids.append(int(tid))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


def _as_messages(messages: list[Any], system: str | None) -> tuple[list[Message], str]:
    """OpenAI-style dicts (or Message objects) -> our messages, pulling out a system turn."""
    role_map = {
        "user": USER,
        "assistant": ASSISTANT,
        "tool": OBSERVATION,
        "observation": OBSERVATION,
        "function": FUNCTION,
        "function_call": FUNCTION,
    }
    out: list[Message] = []
    sys_text = system or ""
    for j, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        role, content = m.get("role"), m.get("content", "")
        if role == "system" and j == 0:
            sys_text = system if system is not None else content
            continue
        if role not in role_map:
            raise ConfigError(f"message {j}: unknown role {role!r}")
        if not isinstance(content, str):
            raise ConfigError(f"message {j}: content must be a string")
        out.append(Message(role_map[role], content))
    return out, sys_text


def render_generation_prompt(
    tokenizer,
    messages: list[Any],
    system: str | None = None,
    prompt_type: str | None = None,
    hf_chat_template: bool = False,
    enable_thinking: bool | None = False,
    tools: str | list | None = None,
) -> list[int]:
    """The exact ids ``tunelab preprocess`` writes for the prompt side of the final answer.

    ``messages`` are OpenAI-style ``{"role", "content"}`` dicts (a leading system message is
    used as the system prompt) ending with a user or tool turn; the reply to generate is not
    included. Exactly one of ``prompt_type`` / ``hf_chat_template`` selects the rendering.
    """
    from tunelab.data.encode import Encoder

    msgs, sys_text = _as_messages(messages, system)
    if not msgs or msgs[-1].role not in (USER, OBSERVATION):
        raise ConfigError("render_generation_prompt needs messages ending with a user/tool turn")
    if isinstance(tools, list | dict):
        tools = json.dumps(tools, ensure_ascii=False)
    enc = Encoder(
        tokenizer,
        prompt_type=prompt_type,
        hf_chat_template=hf_chat_template,
        enable_thinking=enable_thinking,
    )
    conv = Conversation([*msgs, Message(ASSISTANT, "")], system=sys_text, tools=tools or "")
    return enc.prompt_ids(conv)
