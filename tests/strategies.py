"""Hypothesis strategies for request bodies on the four inference routes: valid bodies, and
bodies broken every way a client (or an attacker) can break them.

Shared by the unit fuzz (a stand-in replica) and the e2e fuzz (the real stack).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate", "/chat/generate")

# Fields that set how much work a valid request costs: the e2e fuzz keeps them small.
COSTLY = frozenset({"max_tokens", "max_completion_tokens", "n", "best_of", "min_tokens",
                    "ignore_eos"})

# The fields each route reads, to break one at a time (plus a few of vLLM's extras).
FIELDS = {
    "/v1/chat/completions": ("model", "messages", "temperature", "top_p", "top_k", "stream",
                             "stop", "seed", "logprobs", "top_logprobs", "response_format",
                             "stream_options", "logit_bias", "presence_penalty",
                             "frequency_penalty", "tools", "tool_choice", "user",
                             "max_tokens", "max_completion_tokens", "n", "min_tokens",
                             "ignore_eos", "repetition_penalty", "min_p", "stop_token_ids",
                             "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                             "structured_outputs", "chat_template", "chat_template_kwargs",
                             "add_generation_prompt", "continue_final_message", "priority"),
    "/v1/completions": ("model", "prompt", "temperature", "top_p", "top_k", "stream", "stop",
                        "seed", "logprobs", "echo", "suffix", "stream_options", "logit_bias",
                        "presence_penalty", "max_tokens", "n", "best_of", "min_tokens",
                        "ignore_eos", "prompt_logprobs", "stop_token_ids", "allowed_token_ids",
                        "truncate_prompt_tokens", "structured_outputs", "add_special_tokens",
                        "response_format", "priority"),
    "/generate": ("model", "prompt", "temperature", "top_p", "max_tokens", "do_sample",
                  "stop_sequences", "seed"),
    "/chat/generate": ("model", "messages", "temperature", "top_p", "max_tokens", "do_sample",
                       "stop_sequences", "seed"),
}

TRICKY_STRINGS = ("", " ", "\x00", "\ud800", "\udfff", "\u202e", "\r\n", "\x1b[31m", "\ufeff",
                  "<|im_end|>", "<|endoftext|>", "{{ raise_exception('x') }}", "%s%n",
                  "💥" * 3, "a" * 5000)
EDGE_NUMBERS = (0, -1, 1, 49151, 49152, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**400,
                0.0, -0.0, 1e-320, 1e308, -1e308, 3.0, 2.0000001, float("nan"), float("inf"),
                float("-inf"))

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(EDGE_NUMBERS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(TRICKY_STRINGS))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10) | st.sampled_from(TRICKY_STRINGS),
                                        children, max_size=4)),
    max_leaves=12,
)


def valid_body(path: str, model: str) -> dict[str, Any]:
    """A cheap request the route serves: two tokens, greedy."""
    chat = [{"role": "user", "content": "Hi"}]
    return {
        "/v1/chat/completions": {"model": model, "messages": chat, "max_tokens": 2,
                                 "temperature": 0},
        "/v1/completions": {"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0},
        "/generate": {"prompt": "Hi", "max_tokens": 2, "do_sample": False},
        "/chat/generate": {"messages": chat, "max_tokens": 2, "do_sample": False},
    }[path]


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as Python writes it: NaN and Infinity as bare words; lone surrogates escaped, or
    written raw (invalid UTF-8)."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", errors="surrogatepass")


@st.composite
def broken_body(draw: st.DrawFn, path: str, model: str, keep_cheap: bool) -> bytes:
    body = valid_body(path, model)
    how = draw(st.sampled_from(("field", "field", "message", "drop", "extra", "whole",
                                "bytes", "splice")))
    fields = [f for f in FIELDS[path] if not (keep_cheap and f in COSTLY)]
    if how == "field":
        body[draw(st.sampled_from(fields))] = draw(json_values)
    elif how == "message" and "messages" in body:
        message = dict(body["messages"][0])
        key = draw(st.sampled_from(("role", "content", "name", "tool_calls")))
        message[key] = draw(json_values)
        body["messages"] = draw(st.sampled_from(([message], [body["messages"][0], message])))
    elif how == "drop":
        droppable = [k for k in body if not (keep_cheap and k in COSTLY)]
        del body[draw(st.sampled_from(droppable))]
    elif how == "extra":
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    elif how == "whole":
        return encode(draw(json_values), draw(st.booleans()))
    elif how == "bytes":
        return draw(st.binary(max_size=200))
    elif how == "splice":
        raw = encode(body, True)
        at = draw(st.integers(0, len(raw)))
        cut = draw(st.integers(0, 8))
        return raw[:at] + draw(st.binary(max_size=8)) + raw[at + cut:]
    return encode(body, draw(st.booleans()))


@st.composite
def requests(draw: st.DrawFn, model: str, keep_cheap: bool = False) -> tuple[str, bytes]:
    """(path, raw body): mostly broken, sometimes valid (valid ones may stream)."""
    path = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        body = valid_body(path, model)
        if path.startswith("/v1/") and draw(st.booleans()):
            body["stream"] = True
        return path, encode(body, True)
    return path, draw(broken_body(path, model, keep_cheap))


def assert_error_shape(resp: Any) -> dict[str, Any]:
    """OpenAI's error JSON: exactly message, type, param, code; message and type strings."""
    err = json.loads(resp.content)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def fuzz_routes(post: Callable[[str, bytes], Any], model: str, *, max_examples: int,
                keep_cheap: bool = False) -> None:
    """Send ``max_examples`` generated bodies through ``post(path, raw)``: none may get a 5xx,
    every answer carries a request id, and every error has OpenAI's shape."""

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=requests(model, keep_cheap))
    def one(case: tuple[str, bytes]) -> None:
        path, raw = case
        resp = post(path, raw)
        assert resp.status_code < 500, (path, raw[:300], resp.text[:300])
        assert resp.headers["x-request-id"]
        if resp.status_code >= 400:
            assert_error_shape(resp)

    one()
