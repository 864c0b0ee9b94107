"""Request validation: an OpenAI request body (a parsed JSON object) -> a `GenerationRequest`.

Each accepted field has a validator in a table; a field that is not in the table is refused (as OpenAI
does), and so is a field we know but cannot honour (logprobs, penalties, tools, n > 1): a client must never
get an answer that silently ignored part of its request. Every refusal is an `ApiError` 400 naming the
field (`param`) and what was expected.

Sizes are checked before the work they would cost: the number of messages (and of content parts) and
of prompt token ids before any of them is validated, the prompt's characters before it is tokenized
(`Limits`, from the server's model: a text longer than the context times the longest token can only
have too many tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leapdecode.drafters import available
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams
from leapdecode.server.errors import ApiError, invalid

Validator = Callable[[Any, str], Any]
Prompt = str | list[dict] | list[int]

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_INT = 2**31 - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Limits:
    """How large a request's prompt may be, checked before it is tokenized."""

    max_messages: int = 2048  # messages of a chat request, and text parts of one message
    max_prompt_tokens: int = MAX_INT  # token ids of a completion prompt
    max_prompt_chars: int = MAX_INT  # characters of all messages' texts, or of a text prompt
    context: int = MAX_INT  # the model's context, for the messages

    def __post_init__(self):
        for name in ("max_messages", "max_prompt_tokens", "max_prompt_chars", "context"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One validated chat or text completion request."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: Prompt  # messages (chat), text or token ids (completion)
    max_tokens: int | None  # None: up to the end of the context
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    drafter: str | None = None  # None: the server's default drafter
    max_draft: int | None = None  # None: the server's default

    @property
    def raw(self) -> bool:
        """Text completions continue the prompt as given; chat prompts get the chat template."""
        return self.kind == "completion"


# ------------------------------------------------------------------ scalar validators


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integer(lo: int, hi: int) -> Validator:
    def check(v, param):
        if not _is_int(v) or not lo <= v <= hi:
            raise invalid(f"{param} must be an integer in [{lo}, {hi}], got {v!r}", param)
        return v

    return check


def _number(lo: float, hi: float) -> Validator:
    def check(v, param):
        if not (_is_int(v) or isinstance(v, float)) or not lo <= v <= hi:
            raise invalid(f"{param} must be a number in [{lo}, {hi}], got {v!r}", param)
        return float(v)

    return check


def _boolean(v, param):
    if not isinstance(v, bool):
        raise invalid(f"{param} must be true or false, got {v!r}", param)
    return v


def _text(v, param, *, empty_ok: bool = True) -> str:
    if not isinstance(v, str):
        raise invalid(f"{param} must be a string, got {type(v).__name__}", param)
    if not empty_ok and not v:
        raise invalid(f"{param} must not be empty", param)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} contains a lone surrogate (invalid Unicode)", param) from None
    return v


def _exactly_one(v, param):
    if v != 1 or not _is_int(v):
        raise invalid(f"{param} must be 1 (one completion per request), got {v!r}", param)
    return v


_NEUTRAL: tuple[object, ...] = (False, 0, 0.0, "", [], {})


def _unsupported(what: str) -> Validator:
    """Accepts only the field's neutral value (null, false, 0, empty); anything else is refused."""

    def check(v, param):
        if not any(type(v) is type(n) and v == n for n in _NEUTRAL):
            raise invalid(f"{param}: {what} is not supported by this server", param)

    return check


# ------------------------------------------------------------------ structured fields


def _stop(v, param) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise invalid(f"{param} must be a string or a list of at most {MAX_STOP} strings", param)
    return tuple(_text(s, param, empty_ok=False) for s in items)


def _stream_options(v, param) -> bool:
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise invalid(f"{param} must be an object with only 'include_usage'", param)
    return _boolean(v.get("include_usage", False), f"{param}.include_usage")


def _leap(v, param) -> dict:
    """The extension object: {"drafter": NAME or "none", "max_draft": INT}."""
    if not isinstance(v, dict):
        raise invalid(f'{param} must be an object like {{"drafter": "pld"}}', param)
    unknown = set(v) - {"drafter", "max_draft"}
    if unknown:
        raise invalid(f"{param}: unknown key {min(unknown)!r}; expected drafter, max_draft", param)
    out = {}
    if v.get("drafter") is not None:
        name = _text(v["drafter"], f"{param}.drafter")
        if name not in available():
            raise invalid(
                f"unknown drafter {name!r}; expected one of: {', '.join(available())}",
                f"{param}.drafter",
                code="unknown_drafter",
            )
        out["drafter"] = name
    if v.get("max_draft") is not None:
        out["max_draft"] = _integer(0, 512)(v["max_draft"], f"{param}.max_draft")
    return out


def _content(v, param) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(v, str):
        return _text(v, param)
    if not isinstance(v, list):
        raise invalid(f"{param} must be a string or a list of text parts", param)
    texts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) - {"type", "text"}:
            raise invalid(
                f'{param}[{i}] must be {{"type": "text", "text": ...}} (only text is supported)',
                f"{param}[{i}]",
            )
        texts.append(_text(part.get("text"), f"{param}[{i}].text"))
    return "".join(texts)


def _message(m, param) -> dict:
    if not isinstance(m, dict):
        raise invalid(f"{param} must be an object with 'role' and 'content'", param)
    unknown = set(m) - {"role", "content", "name"}
    if unknown:
        raise invalid(f"{param}: unsupported key {min(unknown)!r}", param)
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    out = {"role": ROLES[role], "content": _content(m.get("content"), f"{param}.content")}
    if m.get("name") is not None:
        out["name"] = _text(m["name"], f"{param}.name")
    return out


def _messages(v, param) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise invalid(f"{param} must be a non-empty list of messages", param)
    return [_message(m, f"{param}[{i}]") for i, m in enumerate(v)]


def _prompt(v, param) -> str | list[int]:
    """A string, a list holding one string, token ids, or a list holding one list of token ids."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return _text(v, param, empty_ok=False)
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return list(v)
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise invalid(f"{param}: one prompt per request (batches are not supported)", param)
    raise invalid(f"{param} must be a non-empty string or a non-empty list of token ids", param)


# ------------------------------------------------------------------ the tables

_COMMON: dict[str, Validator] = {
    "model": lambda v, p: _text(v, p, empty_ok=False),
    "max_tokens": _integer(1, MAX_INT),
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0),
    "top_k": _integer(0, MAX_INT),  # an extension (as in vLLM); 0 = off
    "seed": _integer(-(2**63), 2**64 - 1),
    "stop": _stop,
    "n": _exactly_one,
    "stream": _boolean,
    "stream_options": _stream_options,
    "user": _text,
    "presence_penalty": _unsupported("a presence penalty"),
    "frequency_penalty": _unsupported("a frequency penalty"),
    "logit_bias": _unsupported("logit_bias"),
    "leap": _leap,
}
_CHAT: dict[str, Validator] = {
    **_COMMON,
    "messages": _messages,
    "max_completion_tokens": _integer(1, MAX_INT),
    "logprobs": _unsupported("logprobs"),
    "top_logprobs": _unsupported("top_logprobs"),
    "tools": _unsupported("tool calling"),
    "tool_choice": _unsupported("tool calling"),
    "response_format": lambda v, p: _unsupported("a response_format other than text")(
        None if v == {"type": "text"} else v, p
    ),
}
_COMPLETION: dict[str, Validator] = {
    **_COMMON,
    "prompt": _prompt,
    "logprobs": _unsupported("logprobs"),
    "echo": _unsupported("echo"),
    "suffix": _unsupported("suffix"),
    "best_of": _exactly_one,
}
_TABLES = {"chat": (_CHAT, "messages"), "completion": (_COMPLETION, "prompt")}


def parse_request(kind: str, body: Any, limits: Limits | None = None) -> GenerationRequest:
    """Validate a parsed JSON body for `kind` ("chat" or "completion")."""
    table, prompt_field = _TABLES[kind]
    limits = limits or Limits()
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    for name in body:
        if name not in table:
            raise invalid(f"unrecognized request argument supplied: {name}", name)
    for name in ("model", prompt_field):
        if body.get(name) is None:
            raise invalid(f"missing required parameter: {name}", name)
    _check_counts(body.get(prompt_field), prompt_field, limits)
    v = {name: table[name](value, name) for name, value in body.items() if value is not None}
    _check_chars(v[prompt_field], prompt_field, limits)
    return _build(kind, v, prompt_field)


def _too_long(message: str, param: str) -> ApiError:
    return invalid(message, param, code="context_length_exceeded")


def _check_counts(prompt: Any, param: str, limits: Limits) -> None:
    """Lists too long to be worth validating item by item: messages, content parts, token ids."""
    if not isinstance(prompt, list):
        return
    if param == "messages":
        if len(prompt) > limits.max_messages:
            raise invalid(
                f"messages: at most {limits.max_messages} messages, got {len(prompt)}",
                "messages",
                code="too_many_messages",
            )
        for i, m in enumerate(prompt):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and len(content) > limits.max_messages:
                raise invalid(
                    f"messages[{i}].content: at most {limits.max_messages} parts, got {len(content)}",
                    f"messages[{i}].content",
                    code="too_many_messages",
                )
        return
    ids = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
    if len(ids) > limits.max_prompt_tokens:
        raise _too_long(
            f"the prompt has {len(ids)} tokens; this model's context holds {limits.context}", param
        )


def _check_chars(prompt: Prompt, param: str, limits: Limits) -> None:
    """A text longer than this can only tokenize to more tokens than the context holds."""
    if isinstance(prompt, str):
        chars = len(prompt)
    elif prompt and isinstance(prompt[0], dict):
        chars = sum(len(m["content"]) + len(m.get("name", "")) for m in prompt)
    else:
        return
    if chars > limits.max_prompt_chars:
        raise _too_long(
            f"the prompt has {chars} characters, more than any prompt that fits this model's context of "
            f"{limits.context} tokens (at most {limits.max_prompt_chars} characters)",
            param,
        )


def _build(kind: str, v: dict, prompt_field: str) -> GenerationRequest:
    max_tokens = v.get("max_tokens")
    other = v.get("max_completion_tokens")
    if max_tokens is not None and other is not None and max_tokens != other:
        raise invalid("max_tokens and max_completion_tokens disagree; give one", "max_tokens")
    temperature = v.get("temperature", 1.0)  # OpenAI's default: sampling at temperature 1
    top_p = v.get("top_p", 1.0)
    if top_p == 0.0:  # only the most likely token survives: greedy
        temperature, top_p = 0.0, 1.0
    try:
        sampling = SamplingParams(
            temperature=temperature, top_k=v.get("top_k", 0), top_p=top_p, seed=v.get("seed")
        )
    except LeapError as exc:
        raise invalid(str(exc)) from None
    if "stream_options" in v and not v.get("stream", False):
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    leap = v.get("leap", {})
    return GenerationRequest(
        kind=kind,
        model=v["model"],
        prompt=v[prompt_field],
        max_tokens=max_tokens if max_tokens is not None else other,
        sampling=sampling,
        stop=v.get("stop", ()),
        stream=v.get("stream", False),
        include_usage=v.get("stream_options", False),
        drafter=leap.get("drafter"),
        max_draft=leap.get("max_draft"),
    )
