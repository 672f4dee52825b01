from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app.errors import BadRequestError, from_vllm_error, sse_error
from serve_app.maritalk import ChatGenerateRequest, GenerateRequest, timings
from serve_app.validation import (
    check_generation_body,
    parse_json_object,
    request_error_body,
    validation_error_body,
)


def test_parse_json_object():
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for raw, code in [(b"\xc3", "invalid_encoding"), (b"  ", "invalid_json"),
                      (b"{", "invalid_json"), (b'"s"', "invalid_json"), (b"null", "invalid_json")]:
        with pytest.raises(BadRequestError) as info:
            parse_json_object(raw)
        assert info.value.code == code
        assert info.value.status == 400


def test_check_generation_body_returns_stream_flag():
    assert check_generation_body({}, max_n=4, max_model_len=100) is False
    assert check_generation_body({"stream": None}, max_n=4, max_model_len=100) is False
    assert check_generation_body({"stream": True, "n": 4, "max_tokens": 100},
                                 max_n=4, max_model_len=100) is True
    for bad in ({"n": 5}, {"n": True}, {"best_of": 9}, {"max_tokens": 101},
                {"max_completion_tokens": 0}, {"max_tokens": 1.5}, {"stream": 1}):
        with pytest.raises(BadRequestError) as info:
            check_generation_body(bad, max_n=4, max_model_len=100)
        assert info.value.param == next(iter(bad))


def test_validation_error_body_names_the_field():
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate_json(b'{"prompt": "x", "top_p": 9}')
    err = validation_error_body(info.value)["error"]
    assert err["param"] == "top_p"
    assert err["type"] == "invalid_request_error"
    assert "top_p" in err["message"]


def test_vllm_errors_are_mapped_and_5xx_hidden():
    status, body = from_vllm_error(
        {"message": "This model's maximum context length is 2048 tokens. However...",
         "type": "BadRequestError", "param": "input_tokens", "code": 400})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "input_tokens"
    status, body = from_vllm_error({"message": "Traceback secret", "type": "X", "code": 500})
    assert status == 500 and "secret" not in body["error"]["message"]
    status, body = from_vllm_error({"message": "no model", "type": "NotFoundError", "code": 404})
    assert (status, body["error"]["code"]) == (404, "not_found")


def test_sse_error_framing():
    text = sse_error(500, {"error": {"message": "m"}})
    events = [e for e in text.split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: ")) == {"error": {"message": "m"}}
    assert events[1] == "data: [DONE]"


def test_maritalk_sampling():
    greedy = GenerateRequest(prompt="x", do_sample=False, temperature=0.9, top_p=0.5,
                             stop_sequences=["\n", ""], seed=3, max_tokens=7)
    assert greedy.sampling_kwargs() == {"max_tokens": 7, "stop": ["\n"], "seed": 3,
                                        "temperature": 0.0, "top_p": 1.0}
    sampled = GenerateRequest(prompt="x", temperature=0.9, top_p=0.5)
    kw = sampled.sampling_kwargs()
    assert (kw["temperature"], kw["top_p"], kw["stop"], kw["max_tokens"]) == (0.9, 0.5, None, 512)


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    {"messages": [{"role": "user", "content": "x"}], "temperature": -0.1},
    {"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")},
    {"messages": [{"role": "user", "content": "x"}], "seed": 2**63},
    {"messages": [{"role": "user", "content": "x"}], "unknown": 1},
])
def test_maritalk_chat_rejects(body):
    with pytest.raises(ValidationError):
        ChatGenerateRequest.model_validate(body)


def test_timings():
    assert timings(queued=1.0, scheduled=1.5, first_token=2.0, last_token=4.0) == (0.5, 0.5, 2.0)
    assert timings(queued=1.0, scheduled=0.0, first_token=0.0, last_token=0.0) == (0.0, 0.0, 0.0)


def test_request_error_body_for_what_vllm_validators_raise():
    class VLLMValidationError(ValueError):  # vLLM's: carries the field as `parameter`
        parameter = "prompt"

    err = request_error_body(VLLMValidationError("Either prompt or prompt_embeds"))["error"]
    assert (err["param"], err["code"], err["type"]) == ("prompt", "invalid_request",
                                                        "invalid_request_error")
    assert "Either prompt" in err["message"]
    err = request_error_body(TypeError("x" * 5000))["error"]
    assert err["param"] is None and len(err["message"]) <= 1000
    assert request_error_body(TypeError())["error"]["message"] == "Invalid request (TypeError)."
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": 3})
    assert request_error_body(info.value)["error"]["param"] == "prompt"


def test_a_vllm_501_is_a_400_that_says_what_is_unsupported():
    status, body = from_vllm_error({"message": "beam search is not supported", "type": "X",
                                    "code": 501, "param": None})
    assert status == 400
    assert body["error"]["code"] == "not_supported" and "beam" in body["error"]["message"]


def test_to_serve_error_maps_every_kind_and_hides_internals():
    from ray.serve.exceptions import BackPressureError

    from serve_app.errors import InternalError, OverloadedError, to_serve_error

    bad = BadRequestError("b")
    assert to_serve_error(bad) is bad
    busy = to_serve_error(BackPressureError(num_queued_requests=2, max_queued_requests=1))
    assert isinstance(busy, OverloadedError) and busy.headers == {"Retry-After": "1"}
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", "top_p": 0})
    assert to_serve_error(info.value).status == 400
    internal = to_serve_error(RuntimeError("secret"), "rid-1")
    assert isinstance(internal, InternalError) and internal.status == 500
    assert "secret" not in internal.message and "rid-1" in internal.message


def test_maritalk_accepts_what_vllm_runs():
    hot = GenerateRequest(prompt="x", temperature=3.0, seed=-(2**63), stop_sequences=["a"] * 40)
    kw = hot.sampling_kwargs()
    assert kw["temperature"] == 2.0 and kw["seed"] == -(2**63) and len(kw["stop"]) == 40
    assert GenerateRequest(prompt="x", temperature=1e300).sampling_kwargs()["temperature"] == 2.0


def test_vllm_flag_names_become_our_setting_names():
    from serve_app.errors import from_vllm_error

    status, body = from_vllm_error({"code": 400, "message": 'tool_choice="required" requires '
                                    "--tool-call-parser to be set"})
    assert status == 400
    assert "SERVE_APP_TOOL_CALL_PARSER" in body["error"]["message"]
    assert "--tool-call-parser" not in body["error"]["message"]
