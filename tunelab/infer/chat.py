"""`tunelab chat`: an interactive terminal chat that keeps a window of recent turns.

With a template (``--prompt-type`` or ``--hf-chat-template``) the history is a list of role
messages rendered by `tunelab.data.templates` exactly as preprocess renders training data.
Without one, previous prompts and replies are concatenated as raw text (MindSpeed's
behaviour). When the history holds more than ``history_turns`` exchanges, the oldest one is
dropped before the new message is added.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from tunelab.errors import ConfigError
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig

log = logging.getLogger(__name__)

EXIT_COMMANDS = {"/exit", "/quit", "exit", "quit", "q"}
CLEAR_COMMANDS = {"/clear", "/new", "clear", "new"}
PROMPT = "You >> "
REPLY = "Assistant >> "


class ChatSession:
    """Conversation state and prompt building; `reply` streams the answer's text."""

    def __init__(
        self,
        engine: Engine,
        config: GenerationConfig,
        system: str | None = None,
        history_turns: int = 3,
    ) -> None:
        if history_turns < 0:
            raise ConfigError(f"--history-turns must be >= 0, got {history_turns}")
        self.engine = engine
        self.config = config
        self.system = system
        self.history_turns = history_turns
        self.history: list[dict] = []  # alternating user / assistant messages

    def clear(self) -> None:
        self.history = []

    def _trim(self) -> None:
        while len(self.history) > 2 * self.history_turns:
            del self.history[:2]

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids for the next reply: (trimmed) history + the new user message."""
        messages = [*self.history, {"role": "user", "content": user_text}]
        if self.engine.uses_template:
            return self.engine.encode_chat(messages, system=self.system)
        text = "".join(m["content"] for m in messages)
        if self.system:
            text = self.system + "\n" + text
        return self.engine.encode_text(text)

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the reply's text; the exchange joins the history when it is complete."""
        self._trim()
        ids = self.prompt_ids(user_text)
        max_new = min(self.config.max_new_tokens, self.engine.context_len - len(ids))
        if max_new < 1:
            self.engine.check_prompt(ids)  # raises the context error with the numbers
        parts = []
        for piece in self.engine.stream_text(ids, self.config.replace(max_new_tokens=max_new)):
            parts.append(piece)
            yield piece
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": "".join(parts)},
        ]


def run_repl(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Read-eval-print loop; returns when the user exits or input ends (Ctrl-D)."""
    out = out or sys.stdout
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            return 0
        if text.lower() in CLEAR_COMMANDS:
            session.clear()
            out.write("(history cleared)\n")
            out.flush()
            continue
        out.write(REPLY)
        out.flush()
        try:
            for piece in session.reply(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        except ConfigError:
            raise
        except ValueError as e:  # a context overflow for this message: say so, keep chatting
            out.write(f"[error: {e}]")
        out.write("\n")
        out.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tunelab.infer.options import add_model_arguments, add_sampling_arguments

    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument("--history-turns", type=int, default=3,
                   help="previous exchanges kept in the prompt (default 3; 0 = none)")  # fmt: skip
    p.add_argument("--system", default=None, help="system prompt")


def main(args: argparse.Namespace) -> int:
    from tunelab.infer.options import engine_from_args, generation_config_from_args

    if args.history_turns < 0:
        raise ConfigError(f"--history-turns must be >= 0, got {args.history_turns}")
    engine = engine_from_args(args, max_batch_size=1)
    if not engine.uses_template:
        log.warning(
            "no template given: turns are joined as raw text; pass --prompt-type NAME (as in "
            "preprocess) or --hf-chat-template to chat with the format the model was tuned on"
        )
    config = generation_config_from_args(args, engine.defaults)
    session = ChatSession(engine, config, system=args.system, history_turns=args.history_turns)
    try:
        import readline  # noqa: F401 - arrow keys and line history for input()
    except ImportError:  # not on every platform
        pass
    print("tunelab chat: /clear starts over, /exit (or Ctrl-D) quits", flush=True)
    return run_repl(session)
