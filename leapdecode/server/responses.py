"""OpenAI response objects: completions, streamed chunks (server-sent events) and the `leap_stats`
extension."""

from __future__ import annotations

import json
import time

from leapdecode.engine import Result

DONE = b"data: [DONE]\n\n"
_OBJECTS = {
    "chat": ("chat.completion", "chat.completion.chunk", "chatcmpl-"),
    "completion": ("text_completion", "text_completion", "cmpl-"),
}


def sse(obj: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def usage(result: Result) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": result.stats.prefix_cached_tokens},
    }


def leap_stats(result: Result, queue_s: float) -> dict:
    """Per-request speculative statistics (mean_accepted counts the bonus token: 1.0 = no speed-up)."""
    s = result.stats
    return {
        "drafter": s.drafter,
        "prompt_tokens": s.prompt_tokens,
        "prefix_cached_tokens": s.prefix_cached_tokens,  # prompt tokens reused, not prefilled
        "steps": s.steps,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "mean_accepted": round(s.mean_accepted, 4),
        "accepted_by_depth": list(s.accepted_by_depth),
        "draft_s": round(s.draft_s, 6),
        "verify_s": round(s.verify_s, 6),
        "prefill_s": round(s.prefill_s, 6),
        "decode_s": round(s.decode_s, 6),
        "queue_s": round(queue_s, 6),
        "decode_tokens_per_s": round(s.decode_tokens_per_s, 3),
    }


class Formatter:
    """Builds the objects of one response (one id, one `created` time) for chat or text completions."""

    def __init__(self, kind: str, model: str, request_id: str):
        self.kind, self.model = kind, model
        self.object, self.chunk_object, prefix = _OBJECTS[kind]
        self.id = prefix + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, *, delta: bool, role: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            body = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }

    def completion(self, result: Result, queue_s: float) -> dict:
        """The whole answer of a non-streamed request."""
        choice = self._choice(result.text, result.stats.finish_reason or "stop", delta=False)
        return self._head(self.object) | {
            "choices": [choice],
            "usage": usage(result),
            "leap_stats": leap_stats(result, queue_s),
        }

    def chunk(self, text: str | None, *, role: bool = False, with_usage: bool = False) -> dict:
        """A streamed piece of text (chat: the first chunk also carries the role)."""
        out = self._head(self.chunk_object) | {"choices": [self._choice(text, None, delta=True, role=role)]}
        return out | ({"usage": None} if with_usage else {})

    def final_chunks(self, result: Result, queue_s: float, with_usage: bool) -> list[dict]:
        """The chunk with the finish reason, then (if asked) the usage chunk. `leap_stats` rides on the
        last of them, just before `data: [DONE]`."""
        finish = self._head(self.chunk_object) | {
            "choices": [
                self._choice(
                    None if self.kind == "chat" else "", result.stats.finish_reason or "stop", delta=True
                )
            ]
        }
        stats = {"leap_stats": leap_stats(result, queue_s)}
        if not with_usage:
            return [finish | stats]
        tail = self._head(self.chunk_object) | {"choices": [], "usage": usage(result)} | stats
        return [finish | {"usage": None}, tail]
