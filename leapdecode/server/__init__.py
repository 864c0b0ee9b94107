"""`leap serve`: an OpenAI-compatible HTTP server for leapdecode.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` as
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text format).

Extension to OpenAI's request: an optional top-level object ``leap``::

    {"model": "...", "messages": [...], "leap": {"drafter": "pld", "max_draft": 16}}

``drafter`` is any name of `leapdecode.drafters.available()`; ``"none"`` switches speculation off for this
request; without it the server's ``--drafter`` applies. ``max_draft`` caps the draft tokens verified per
step. With the official ``openai`` client: ``extra_body={"leap": {"drafter": "none"}}``. Unknown keys or
names are a 400 error.

Extension to OpenAI's response: ``leap_stats``, the request's speculative statistics (drafter,
prompt_tokens, prefix_cached_tokens — prompt tokens reused from the prefix cache, not prefilled —, steps,
drafted, accepted, mean_accepted — tokens committed per step, bonus included —, accepted_by_depth,
draft_s, verify_s, prefill_s, decode_s, queue_s, decode_tokens_per_s); ``usage`` carries
``prompt_tokens_details.cached_tokens`` as OpenAI's does. Non-streamed responses carry it at
the top level; streamed responses on their last chunk before ``data: [DONE]`` (the usage chunk when
``stream_options.include_usage`` is set, else the chunk with the finish reason).

Without ``max_tokens`` a request generates at most ``--default-max-tokens`` (2048; 0 = to the end of the
context), because each request preallocates its KV cache; ``max_tokens`` itself may go up to the end of
the context (beyond it: 400, code ``context_length_exceeded``).

Concurrency: one worker thread runs the active generations' forwards as one batched forward per step
(`leapdecode.server.batching`), or with ``--no-batch`` interleaves them step by step; see
`leapdecode.server.scheduler`. Prefix cache (``--prefix-cache-mb``, `leapdecode.prefix_cache`): a prompt
that starts like an earlier prompt or conversation prefills only the rest, with the same output.
Sampling follows OpenAI's defaults (temperature 1 unless given);
``temperature: 0`` (or ``top_p: 0``) is greedy decoding.

Prompts: message texts are tokenized as plain text (special tokens only where the chat template writes
them, so no message can forge a turn); a text completion's ``prompt`` is taken as written, and a prompt of
token ids is used as is, for whoever needs special tokens of their own. A prompt that cannot fit the
context (too many token ids, or more characters than the context times the longest token) and a chat of
more than ``max_messages`` messages are refused before any tokenizing.

Defences (`ServerConfig`, `leapdecode.server.intake`, `leapdecode.server.protocol`): the Host header must
name loopback or an allowed host; headers and bodies must arrive within their timeouts; open connections
are capped; malformed HTTP gets OpenAI's error JSON; on shutdown every stream ends with its last token or
an error event, then ``data: [DONE]`` (`leapdecode.server.runner`).
"""

import importlib

__all__ = ["BackgroundServer", "ServerConfig", "ServerProcess", "build_app"]
_HOMES = {
    "BackgroundServer": "leapdecode.server.runner",
    "ServerConfig": "leapdecode.server.app",
    "ServerProcess": "leapdecode.server.runner",
    "build_app": "leapdecode.server.app",
}


def __getattr__(name: str):
    # Imported on first use, so that `leap` loads its other subcommands without the HTTP stack.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
