"""The contract's bounded body reader (``license_contract.read_bounded``), which the ingress and
the license server both use; each side's mapping to its own errors is tested with its app."""

from __future__ import annotations

import asyncio

import pytest

from license_contract import BodyError, read_bounded


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


async def _endless():
    while True:
        yield b"x" * 64


async def _unread():
    raise AssertionError("the body was read")
    yield b""  # an async generator


def read(content_length, chunks, limit=10):
    return asyncio.run(read_bounded(content_length, chunks, limit))


def refusal(content_length, chunks, limit=10):
    with pytest.raises(BodyError) as caught:
        read(content_length, chunks, limit)
    return caught.value


@pytest.mark.parametrize("content_length", [None, "10", "0010"])
def test_a_body_within_the_limit_is_read_whole(content_length):
    assert read(content_length, _chunks(b"12345", b"", b"67890")) == b"1234567890"


def test_an_empty_body():
    assert read("0", _chunks()) == b""
    assert read(None, _chunks()) == b""


@pytest.mark.parametrize("content_length", ["11", "1" + "0" * 30, "9" * 5000])
def test_a_declared_length_above_the_limit_is_refused_before_reading(content_length):
    err = refusal(content_length, _unread())
    assert (err.status, err.code) == (413, "request_too_large")
    assert err.message == "The request body is above the 10 byte limit."


def test_a_body_streamed_past_the_limit_is_refused_while_it_streams():
    for content_length in (None, "5"):  # a lying Content-Length does not get past either
        err = refusal(content_length, _endless())
        assert (err.status, err.code) == (413, "request_too_large")


@pytest.mark.parametrize("content_length", ["", "abc", "-1", "1.5", "1e3", " 5", "5 ", "0x10",
                                            "²", "5, 5", "+5"])
def test_a_content_length_that_is_not_a_whole_number_is_400(content_length):
    err = refusal(content_length, _unread())
    assert (err.status, err.code) == (400, "invalid_content_length")
    assert repr(content_length) in err.message and str(err) == err.message


def test_a_huge_bad_content_length_is_quoted_short():
    assert len(refusal("x" * 10_000, _unread()).message) < 120
