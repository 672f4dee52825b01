"""The MariTalk Local wire format: what ``maritalk.MariTalkLocal`` sends and expects back.

``POST /generate`` takes a raw ``prompt``; ``POST /chat/generate`` takes ``messages``. Both answer
``{"output", "queue_time", "prompt_time", "generation_time", ...}`` in seconds, where
``generation_time`` is decode time (first to last token): MariTalk Local's benchmark divides generated
tokens by it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# vLLM's SamplingParams refuses a temperature above 2 (and checks again where its engine core
# decodes the request, so it cannot be bypassed). MariTalk Local accepts more, and its benchmark
# tool sends 3.0 on purpose for longer answers: a higher temperature runs at this one, the
# flattest distribution vLLM samples from.
VLLM_MAX_TEMPERATURE = 2.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _GenerateParams(BaseModel):
    """The sampling fields of ``MariTalkLocal.generate`` and ``generate_raw``, with the client's
    defaults. Each accepts what vLLM's ``SamplingParams`` can run."""

    # The client always sends every field; extra keys are refused so a typo is not silently
    # ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.7, ge=0.0, description=(
        f"Any finite value >= 0; above {VLLM_MAX_TEMPERATURE:g} it runs at "
        f"{VLLM_MAX_TEMPERATURE:g}."))
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1, description="At most what the context leaves after the "
                            "prompt (checked on the replica, which tokenizes).")
    do_sample: bool = True
    stop_sequences: list[str] = Field(default_factory=list)
    # vLLM's OpenAI layer takes any 64-bit seed; -1 means none, as in vLLM.
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    model: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``SamplingParams``; ``do_sample=False`` is greedy."""
        kwargs: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "stop": [s for s in self.stop_sequences if s] or None,
            "seed": self.seed,
        }
        if self.do_sample:
            kwargs.update(temperature=min(self.temperature, VLLM_MAX_TEMPERATURE),
                          top_p=self.top_p)
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
