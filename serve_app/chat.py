"""``python -m serve_app chat``: a conversation in the terminal, as MariTalk Local's
``--interactive``, through the same OpenAI API, key and limits as any client.

Answers stream as they are generated; the conversation is kept and sent whole each turn, under
one session id (``X-Session-Id`` and OpenAI's ``user`` field), so that every turn reaches the
replica whose prefix cache holds the conversation so far (``sessions.py``). ``/reset`` starts a
new conversation, ``/exit`` or Ctrl-D ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any, TextIO

import httpx

HELP = "Type a message; /reset starts over, /exit (or Ctrl-D) ends."


def _error_text(resp: httpx.Response) -> str:
    try:
        error = json.loads(resp.read())["error"]
        text = f"{error['message']} ({error.get('code') or error.get('type')})"
    except (ValueError, KeyError, TypeError):
        text = resp.text[:300]
    retry = resp.headers.get("retry-after")
    return f"HTTP {resp.status_code}: {text}" + (f" Retry after {retry} s." if retry else "")


class Chat:
    """One conversation against ``url``; ``transport`` is the seam tests use."""

    def __init__(self, url: str, key: str | None = None, model: str | None = None,
                 system: str | None = None, max_tokens: int | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                    transport=transport, timeout=httpx.Timeout(600, connect=10))
        self.model = model
        self._system = system
        self._max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self.session = f"chat-{uuid.uuid4().hex}"
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self._system}] if self._system else [])

    def pick_model(self) -> str:
        if self.model is None:
            resp = self._client.get("/v1/models")
            if resp.status_code != 200:
                raise RuntimeError(_error_text(resp))
            self.model = resp.json()["data"][0]["id"]
        return self.model

    def say(self, text: str, out: TextIO) -> str | None:
        """Send one user turn, writing the answer to ``out`` as it streams; returns it (None
        when the server refused the turn, which is then not kept)."""
        body: dict[str, Any] = {"model": self.pick_model(), "stream": True, "user": self.session,
                                "messages": [*self.messages, {"role": "user", "content": text}]}
        if self._max_tokens:
            body["max_tokens"] = self._max_tokens
        parts: list[str] = []
        with self._client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"X-Session-Id": self.session}) as resp:
            if resp.status_code != 200:
                out.write(f"[{_error_text(resp)}]\n")
                return None
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out.write(f"\n[{event['error'].get('message')}]\n")
                    return None
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        parts.append(piece)
                        out.write(piece)
                        out.flush()
        out.write("\n")
        answer = "".join(parts)
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": answer}]
        return answer

    def close(self) -> None:
        self._client.close()


def repl(chat: Chat, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    try:
        out.write(f"Chatting with {chat.pick_model()} (session {chat.session}). {HELP}\n")
    except (httpx.HTTPError, RuntimeError) as exc:
        out.write(f"Cannot reach the server: {exc}\n")
        return 1
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            out.write(f"New conversation (session {chat.session}).\n")
            continue
        try:
            chat.say(text, out)
        except httpx.HTTPError as exc:
            out.write(f"[the server did not answer: {exc}]\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app chat", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:9000")
    parser.add_argument("--key", help="an API key, if the server requires one")
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--system", help="a system prompt for the conversation")
    parser.add_argument("--max-tokens", type=int, help="per answer (default: the server's)")
    ns = parser.parse_args(argv)
    chat = Chat(ns.url, ns.key, ns.model, ns.system, ns.max_tokens)
    try:
        return repl(chat)
    finally:
        chat.close()
