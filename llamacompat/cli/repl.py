"""``llamacompat chat`` without a message: an interactive chat on one context.

Answers stream as they are generated. The completion runs on a worker thread so
that Ctrl-C, which Python delivers to the main thread, stops the answer
(``stop_completion``) instead of leaving the program. ``/save FILE`` writes the
KV cache as a session file and the conversation beside it (``FILE.chat.json``),
so ``/load FILE`` resumes both without evaluating the history again.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from typing import Any, Callable, TextIO

from ..context import LlamaContext
from ..errors import LlamaError
from ..sessions.atomic import atomic_write_bytes

__all__ = ["Repl", "HELP"]

HELP = """commands:
  /reset        forget the conversation
  /save FILE    save the conversation and its KV cache (FILE and FILE.chat.json)
  /load FILE    resume a conversation saved with /save
  /image PATH   attach an image to your next message (needs --mmproj)
  /help         this list
  /quit         leave (Ctrl-D too); Ctrl-C stops an answer"""


class Repl:
    """Reads lines, answers them with ``ctx``'s chat template, keeps the history."""

    def __init__(self, ctx: LlamaContext, request: dict[str, Any], system: str | None,
                 read: Callable[[str], str] = input, out: TextIO = sys.stdout, images: list[str] | None = None) -> None:
        self.ctx = ctx
        self.request = request  # sampling settings for every answer
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, Any]] = list(self.system)
        self._read = read
        self._out = out
        self.images: list[str] = list(images or ())  # attached to the next message (/image)

    def run(self) -> int:
        self._say("Chat with the model. /help lists the commands; Ctrl-D leaves.")
        while True:
            try:
                line = self._read("> ").strip()
            except EOFError:
                self._say("")
                return 0
            except KeyboardInterrupt:  # at the prompt: nothing to stop
                self._say("\n(Ctrl-D or /quit leaves)")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line) == "quit":
                    return 0
                continue
            content: Any = line
            if self.images:
                content = [*({"type": "image_url", "image_url": {"url": p}} for p in self.images),
                           {"type": "text", "text": line}]
                self.images = []
            self.messages.append({"role": "user", "content": content})
            answer = self._answer()
            if answer is not None:
                self.messages.append({"role": "assistant", "content": answer})

    # -- answers --------------------------------------------------------------------
    def _answer(self) -> str | None:
        """Stream one answer; the text so far if Ctrl-C stopped it, None if it failed."""
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        request = {**self.request, "messages": self.messages}

        def work() -> None:
            try:
                result = self.ctx.completion(request, lambda event: events.put(("token", event["token"])))
                events.put(("done", result))
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                events.put(("error", err))

        threading.Thread(target=work, name="llamacompat-chat", daemon=True).start()
        text = []
        while True:
            try:
                kind, value = events.get()
            except KeyboardInterrupt:
                self.ctx.stop_completion()  # the worker then finishes with interrupted: True
                continue
            if kind == "token":
                text.append(value)
                self._out.write(value)
                self._out.flush()
            elif kind == "error":
                self.messages.pop()  # the question had no answer: leave the history as it was
                self._say(f"\nllamacompat: error [{getattr(value, 'code', 'error')}]: {value}")
                return None
            else:
                self._say(" [interrupted]" if value["interrupted"] else "")
                return value.get("content", value["text"]) if not value["interrupted"] else "".join(text)

    # -- commands ----------------------------------------------------------------
    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            self._say(HELP)
        elif name == "/reset":
            self.messages = list(self.system)
            self._say("(conversation forgotten)")
        elif name == "/image":
            if not arg or not os.path.isfile(arg):
                self._say("usage: /image PATH (an existing image file)")
            elif not self.ctx.is_multimodal_enabled():
                self._say("images need a projector: start the chat with --mmproj FILE")
            else:
                self.images.append(arg)
                self._say(f"(image attached to your next message: {arg})")
        elif name in ("/save", "/load") and not arg:
            self._say(f"usage: {name} FILE")
        elif name == "/save":
            self._guard(self._save, arg)
        elif name == "/load":
            self._guard(self._load, arg)
        else:
            self._say(f"unknown command {name}; /help lists them")
        return None

    def _guard(self, action: Callable[[str], None], path: str) -> None:
        try:
            action(path)
        except (LlamaError, OSError, ValueError) as err:
            self._say(f"llamacompat: error: {err.detail if isinstance(err, LlamaError) else err}")

    def _save(self, path: str) -> None:
        tokens = self.ctx.save_session(path)
        history = json.dumps({"messages": self.messages}, ensure_ascii=False, indent=1).encode()
        atomic_write_bytes(path + ".chat.json", history)
        self._say(f"(saved {len(self.messages)} messages, {tokens} tokens to {path})")

    def _load(self, path: str) -> None:
        with open(path + ".chat.json", encoding="utf-8") as f:
            messages = json.load(f)["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{path}.chat.json does not hold a list of messages")
        loaded = self.ctx.load_session(path)
        self.messages = messages
        self._say(f"(loaded {len(messages)} messages, {loaded['tokens_loaded']} tokens from {path})")

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()
