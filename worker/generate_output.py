"""The offline ``Engine.generate`` path's two ends: a prompt in as token ids, deltas out as one output."""

from __future__ import annotations

from collections.abc import Sequence

from lorafleet.worker.tokenizer import Tokenizer
from lorafleet.worker.types import GenerationOutput, Request, TokenDelta


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | Sequence[int], index: int) -> list[int]:
    """Token ids of prompt number ``index`` (text needs a tokenizer; an empty prompt is an error)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(
                f"prompt {index} is text, but this model was loaded without a tokenizer "
                "(no tokenizer.json, or skip_tokenizer_init): pass token-id lists"
            )
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    return ids


def assemble_output(request: Request, deltas: list[TokenDelta]) -> GenerationOutput:
    """One request's deltas, the last of them final, joined into its output."""
    final = deltas[-1]
    assert final.finish_reason is not None
    logprobs = None
    if request.sampling.logprobs:
        logprobs = tuple(lp for d in deltas for lp in (d.new_logprobs or ()))
    tops = None
    if request.sampling.top_logprobs:
        tops = tuple(top for d in deltas for top in (d.new_top_logprobs or ()))
    return GenerationOutput(
        request.request_id,
        request.prompt_token_ids,
        tuple(t for d in deltas for t in d.new_token_ids),
        "".join(d.new_text for d in deltas),
        final.finish_reason,
        logprobs,
        final.error,
        tops,
    )
