"""The MariTalk Local wire format: what ``maritalk.MariTalkLocal`` sends and expects back.

``POST /generate`` takes a raw ``prompt``; ``POST /chat/generate`` takes ``messages``. Both answer
``{"output", "queue_time", "prompt_time", "generation_time", ...}`` in seconds, where
``generation_time`` is decode time (first to last token): the seed's benchmark divides generated
tokens by it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 16


class _GenerateParams(BaseModel):
    # The client always sends every field; extra keys are refused so a typo is not silently
    # ignored.
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    do_sample: bool = True
    stop_sequences: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    model: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``SamplingParams``; ``do_sample=False`` is greedy."""
        kwargs: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "stop": [s for s in self.stop_sequences if s] or None,
            "seed": self.seed,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=0.0, top_p=1.0)
        return kwargs


class GenerateRequest(_GenerateParams):
    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatGenerateRequest(_GenerateParams):
    messages: list[ChatMessage] = Field(min_length=1)


class GenerateResponse(BaseModel):
    output: str
    queue_time: float
    prompt_time: float
    generation_time: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


def timings(
    *,
    queued: float,
    scheduled: float,
    first_token: float,
    last_token: float,
) -> tuple[float, float, float]:
    """(queue, prompt, generation) seconds from one clock's timestamps.

    queue = waiting for the scheduler, prompt = prefill up to the first token, generation =
    first to last token (0 for a one-token answer). Negative gaps (a missing stamp) become 0.
    """
    queue = max(0.0, scheduled - queued)
    prompt = max(0.0, first_token - scheduled)
    generation = max(0.0, last_token - first_token)
    return queue, prompt, generation
