"""``python -m serve_app chat``: streamed answers, the conversation kept, one session id, the
server's refusals shown and not kept. A mock transport answers as the app does."""

from __future__ import annotations

import io
import json

import httpx

from serve_app.chat import Chat, repl


class Server:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.sessions: list[str] = []
        self.refuse_next = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        if self.refuse_next:
            self.refuse_next = False
            return httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {
                "message": "Rate limit reached", "type": "requests", "param": None,
                "code": "rate_limit_exceeded"}})
        body = json.loads(request.content)
        self.bodies.append(body)
        self.sessions.append(request.headers["x-session-id"])
        words = [f"answer{len(self.bodies)}", " done"]
        events = [{"choices": [{"delta": {"role": "assistant"}}]}]
        events += [{"choices": [{"delta": {"content": w}}]} for w in words]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def run(lines, server, **kw):
    chat = Chat("http://app", transport=httpx.MockTransport(server), **kw)
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert repl(chat, read, out) == 0
    return out.getvalue(), chat


def test_a_conversation_is_kept_and_sent_under_one_session():
    server = Server()
    printed, chat = run(["hello", "and then?"], server, key="sak_x", system="Be brief.")
    assert "answer1 done" in printed and "answer2 done" in printed
    first, second = server.bodies
    assert first["model"] == "m" and first["stream"] is True
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == "answer1 done"
    assert len(set(server.sessions)) == 1 and first["user"] == server.sessions[0]


def test_a_refused_turn_is_shown_and_not_kept():
    server = Server()
    server.refuse_next = True
    printed, _ = run(["too fast", "again"], server)
    assert "HTTP 429: Rate limit reached (rate_limit_exceeded) Retry after 7 s." in printed
    (only,) = server.bodies
    assert [m["content"] for m in only["messages"]] == ["again"]


def test_reset_starts_a_new_session():
    server = Server()
    run(["one", "/reset", "two", "/exit", "never sent"], server)
    assert len(server.bodies) == 2 and len(set(server.sessions)) == 2
    assert len(server.bodies[1]["messages"]) == 1
