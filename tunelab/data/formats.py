"""Raw rows -> ``Conversation``: handlers by MindSpeed-LLM name, ``--map-keys`` column mapping.

Handlers (aliases in brackets):
- ``GeneralPretrainHandler`` [pretrain]: the text of each ``--json-keys`` column.
- ``AlpacaStyleInstructionHandler`` [alpaca]: instruction / input / output / system / history.
- ``SharegptStyleInstructionHandler`` [sharegpt, openai]: a list of role/content messages.
- ``AlpacaStylePairwiseHandler`` [pairwise], ``SharegptStylePairwiseHandler`` [sharegpt_pairwise]:
  a prompt plus ``chosen`` / ``rejected`` answers.

Every user-caused problem raises ``DataError`` naming the row (``where``) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError, DataError

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
PROMPT_ROLES = (USER, OBSERVATION)  # turns the model reads
ANSWER_ROLES = (ASSISTANT, FUNCTION)  # turns the model writes


@dataclass
class Message:
    role: str  # user | assistant | observation | function
    content: str
    train: bool = True  # False: never supervised, even if an assistant turn


@dataclass
class Conversation:
    messages: list[Message]
    system: str = ""
    tools: str = ""


@dataclass
class PairwiseSample:
    prompt: Conversation  # ends with a user/observation turn
    chosen: Message
    rejected: Message


HANDLERS = {
    "GeneralPretrainHandler": "pretrain",
    "AlpacaStyleInstructionHandler": "alpaca",
    "SharegptStyleInstructionHandler": "sharegpt",
    "AlpacaStylePairwiseHandler": "alpaca_pairwise",
    "SharegptStylePairwiseHandler": "sharegpt_pairwise",
}
ALIASES = {
    "pretrain": "GeneralPretrainHandler",
    "alpaca": "AlpacaStyleInstructionHandler",
    "sharegpt": "SharegptStyleInstructionHandler",
    "openai": "SharegptStyleInstructionHandler",
    "pairwise": "AlpacaStylePairwiseHandler",
    "alpaca_pairwise": "AlpacaStylePairwiseHandler",
    "sharegpt_pairwise": "SharegptStylePairwiseHandler",
}

ALPACA_KEYS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": None,
    "history": None,
    "chosen": "chosen",
    "rejected": "rejected",
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
SHAREGPT_KEYS = {
    "messages": "conversations",
    "system": "system",
    "tools": "tools",
    "chosen": "chosen",
    "rejected": "rejected",
}


def resolve_handler(name: str | None) -> tuple[str, str]:
    """(MindSpeed class name, kind) for a handler name or alias; empty means pretraining."""
    if not name:
        return "GeneralPretrainHandler", "pretrain"
    canonical = ALIASES.get(name, name)
    if canonical not in HANDLERS:
        known = ", ".join(sorted(HANDLERS) + sorted(ALIASES))
        raise ConfigError(f"unknown --handler-name {name!r}; choose one of: {known}")
    return canonical, HANDLERS[canonical]


@dataclass
class ColumnMap:
    """Resolved ``--map-keys``: attribute name -> column name, and the ShareGPT role tags."""

    kind: str
    keys: dict[str, str | None]
    tags: dict[str, str] = field(default_factory=dict)

    def role_of(self) -> dict[str, str]:
        t = self.tags
        return {
            t["user_tag"]: USER,
            t["assistant_tag"]: ASSISTANT,
            t["observation_tag"]: OBSERVATION,
            t["function_tag"]: FUNCTION,
        }


def parse_map_keys(kind: str, map_keys: str | dict | None, alias: str | None = None) -> ColumnMap:
    """Merge ``--map-keys`` (JSON text or dict) over the handler's defaults, as MindSpeed does."""
    if isinstance(map_keys, str) and map_keys.strip():
        try:
            user = json.loads(map_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--map-keys is not valid JSON ({e}): {map_keys!r}") from None
    else:
        user = dict(map_keys or {})
    if not isinstance(user, dict):
        raise ConfigError(f"--map-keys must be a JSON object, got {type(user).__name__}")
    if kind in ("alpaca", "alpaca_pairwise"):
        defaults, tags = dict(ALPACA_KEYS), {}
    elif kind in ("sharegpt", "sharegpt_pairwise"):
        defaults = dict(SHAREGPT_KEYS)
        tags = dict(OPENAI_TAGS if alias == "openai" else SHAREGPT_TAGS)
        if alias == "openai":
            defaults["messages"] = "messages"
    else:
        if user:
            raise ConfigError("--map-keys applies to instruction handlers only (alpaca/sharegpt)")
        return ColumnMap(kind, {})
    for key, value in user.items():
        if key == "tags" and tags:
            if not isinstance(value, dict):
                raise ConfigError('--map-keys "tags" must be an object like {"role_tag": "role"}')
            for tag, col in value.items():
                if tag not in tags:
                    raise ConfigError(
                        f"unknown --map-keys tag {tag!r}; valid tags: {', '.join(tags)}"
                    )
                tags[tag] = str(col)
        elif key in defaults:
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"--map-keys {key!r} must name a column (a string)")
            defaults[key] = value
        else:
            valid = list(defaults) + (["tags"] if tags else [])
            raise ConfigError(f"unknown --map-keys key {key!r}; valid keys: {', '.join(valid)}")
    return ColumnMap(kind, defaults, tags)


def _text(row: dict, col: str | None, where: str, required: bool) -> str:
    if col is None:
        return ""
    if col not in row or row[col] is None:
        if required:
            present = ", ".join(map(str, row)) or "none"
            raise DataError(
                f"{where}: missing required column {col!r} (columns present: {present}); "
                "map your column names with --map-keys"
            )
        return ""
    value = row[col]
    if not isinstance(value, str):
        raise DataError(f"{where}: column {col!r} must be a string, got {type(value).__name__}")
    return value


def _tools(row: dict, col: str | None, where: str) -> str:
    if col is None or row.get(col) is None:
        return ""
    value = row[col]
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    raise DataError(
        f"{where}: column {col!r} must be a JSON string or list, got {type(value).__name__}"
    )


def alpaca_prompt(row: dict, cmap: ColumnMap, where: str) -> Conversation:
    """History pairs, then ``instruction`` and ``input`` joined by a newline, as one user turn."""
    k = cmap.keys
    messages: list[Message] = []
    hist_col = k.get("history")
    history = row.get(hist_col) if hist_col else None
    if history is not None:
        if not isinstance(history, list):
            raise DataError(f"{where}: column {hist_col!r} must be a list of [instruction, answer]")
        for j, pair in enumerate(history):
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)
            ):
                raise DataError(
                    f"{where}: {hist_col}[{j}] must be a pair of strings [instruction, answer], "
                    f"got {pair!r}"
                )
            messages += [Message(USER, pair[0]), Message(ASSISTANT, pair[1])]
    prompt = _text(row, k["prompt"], where, required=True)
    query = _text(row, k.get("query"), where, required=False)
    content = "\n".join(x for x in (prompt, query) if x)
    if not content:
        raise DataError(f"{where}: empty prompt (columns {k['prompt']!r} and {k.get('query')!r})")
    messages.append(Message(USER, content))
    system = _text(row, k.get("system"), where, required=False)
    return Conversation(messages, system=system)


def alpaca_conversation(row: dict, cmap: ColumnMap, where: str) -> Conversation:
    conv = alpaca_prompt(row, cmap, where)
    col = cmap.keys["response"]
    if isinstance(row.get(col), list):
        raise DataError(
            f"{where}: column {col!r} holds a list; several answers are only valid for a "
            "pairwise handler"
        )
    response = _text(row, col, where, required=True)
    if not response:
        raise DataError(f"{where}: empty response in column {col!r}")
    conv.messages.append(Message(ASSISTANT, response))
    return conv


def _sharegpt_messages(row: dict, cmap: ColumnMap, where: str) -> tuple[list[Message], str]:
    col = cmap.keys["messages"]
    t = cmap.tags
    if col not in row or row[col] is None:
        present = ", ".join(map(str, row)) or "none"
        hint = (
            '; for OpenAI-style "messages" use --handler-name openai'
            if "messages" in row and col != "messages"
            else ""
        )
        raise DataError(
            f"{where}: missing required column {col!r} (columns present: {present}){hint}"
        )
    raw = row[col]
    if not isinstance(raw, list):
        raise DataError(f"{where}: column {col!r} must be a list of messages")
    if not raw:
        raise DataError(f"{where}: empty conversation in column {col!r}")
    roles = cmap.role_of()
    system = ""
    messages: list[Message] = []
    for j, m in enumerate(raw):
        field_name = f"{col}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field_name} must be an object, got {type(m).__name__}")
        for tag in (t["role_tag"], t["content_tag"]):
            if tag not in m:
                raise DataError(f"{where}: {field_name} has no {tag!r} key")
        role, content = m[t["role_tag"]], m[t["content_tag"]]
        if not isinstance(content, str):
            raise DataError(
                f"{where}: {field_name}.{t['content_tag']} must be a string, "
                f"got {type(content).__name__}"
            )
        train = m.get("train", True)
        if not isinstance(train, bool):
            raise DataError(f"{where}: {field_name}.train must be true or false, got {train!r}")
        if role == t["system_tag"] and j == 0:
            system = content
            continue
        if role not in roles:
            allowed = ", ".join([*roles, t["system_tag"] + " (first message only)"])
            raise DataError(
                f"{where}: {field_name}.{t['role_tag']} is the unknown role {role!r}; "
                f"allowed: {allowed}; map role names with --map-keys tags"
            )
        messages.append(Message(roles[role], content, train))
    for j, m in enumerate(messages):
        expected = PROMPT_ROLES if j % 2 == 0 else ANSWER_ROLES
        if m.role not in expected:
            raise DataError(
                f"{where}: column {col!r}: turn {j} is {m.role!r} but turns must alternate "
                "user/observation then assistant/function_call"
            )
    if not messages:
        raise DataError(f"{where}: empty conversation in column {col!r} (only a system message)")
    return messages, system


def sharegpt_conversation(row: dict, cmap: ColumnMap, where: str) -> Conversation:
    messages, system = _sharegpt_messages(row, cmap, where)
    if len(messages) % 2:
        raise DataError(
            f"{where}: column {cmap.keys['messages']!r} ends with a {messages[-1].role} turn; "
            "a training conversation must end with an assistant turn"
        )
    if not system:
        system = _text(row, cmap.keys.get("system"), where, required=False)
    return Conversation(messages, system, _tools(row, cmap.keys.get("tools"), where))


def _answer(row: dict, col: str, cmap: ColumnMap, where: str) -> Message:
    if col not in row or row[col] is None:
        raise DataError(f"{where}: missing required column {col!r}")
    value = row[col]
    if isinstance(value, str):
        return Message(ASSISTANT, value)
    if isinstance(value, dict) and cmap.tags:
        role = cmap.role_of().get(value.get(cmap.tags["role_tag"]))
        content = value.get(cmap.tags["content_tag"])
        if role in ANSWER_ROLES and isinstance(content, str):
            return Message(role, content)
    raise DataError(f"{where}: column {col!r} must be an answer string or an assistant message")


def pairwise_sample(row: dict, cmap: ColumnMap, where: str) -> PairwiseSample:
    if cmap.kind == "alpaca_pairwise":
        prompt = alpaca_prompt(row, cmap, where)
    else:
        messages, system = _sharegpt_messages(row, cmap, where)
        if len(messages) % 2 == 0:
            raise DataError(
                f"{where}: a pairwise conversation must end with a user turn; "
                "the answers go in the chosen/rejected columns"
            )
        if not system:
            system = _text(row, cmap.keys.get("system"), where, required=False)
        prompt = Conversation(messages, system, _tools(row, cmap.keys.get("tools"), where))
    chosen = _answer(row, cmap.keys["chosen"], cmap, where)
    rejected = _answer(row, cmap.keys["rejected"], cmap, where)
    return PairwiseSample(prompt, chosen, rejected)


def to_sample(row: Any, cmap: ColumnMap, where: str) -> Conversation | PairwiseSample:
    """One raw row -> the handler's sample type (pretraining rows are handled elsewhere)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if cmap.kind == "alpaca":
        return alpaca_conversation(row, cmap, where)
    if cmap.kind == "sharegpt":
        return sharegpt_conversation(row, cmap, where)
    return pairwise_sample(row, cmap, where)


def pretrain_texts(row: Any, json_keys: list[str], where: str) -> list[str]:
    """The text of each ``--json-keys`` column of a pretraining row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return [_text(row, key, where, required=True) for key in json_keys]
