"""Tokenizer and chat template, built from GGUF metadata or a Hugging Face folder.

The GGUF path follows the file's own pre-tokenizer (`tokenizer.ggml.pre`): SmolLM2 splits digits one by
one, Llama 3 and Qwen2 use their own split regexes. Building a plain byte-level tokenizer instead (as
some loaders do) tokenizes numbers and newlines differently from the model's training.

Chat messages are data, never markup: `encode_chat` gives special tokens (``<|im_start|>``, ``<s>``, ...)
only where the chat template writes them; the same text typed inside a message is tokenized as plain
text, so no message can forge a turn. Whoever needs special tokens of their own passes token ids.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from leapdecode.errors import LeapError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>")


def _byte_level_pre(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    regex_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), regex_level])
    return regex_level


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for tok, score in zip(tokens, scores):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _gguf_backend(meta: dict) -> tokenizers.Tokenizer:
    kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tk.pre_tokenizer = _byte_level_pre(meta.get("tokenizer.ggml.pre", "default"))
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        merges = _spm_merges(tokens, meta["tokenizer.ggml.scores"])
        unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
        tk = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        prefix = [normalizers.Prepend("▁")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
        tk.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
    else:
        raise LeapError(f"GGUF tokenizer model {kind!r} is not supported (expected gpt2 or llama)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [
        AddedToken(tokens[i], special=t == 3, normalized=False) for i, t in enumerate(types) if t in (3, 4)
    ]
    tk.add_tokens(added)
    return tk


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        chat_template: str | None,
        add_bos: bool,
    ):
        self.backend = backend
        self.bos_id, self.eos_ids, self.add_bos = bos_id, set(eos_ids), add_bos
        self.chat_template = chat_template or _CHATML
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        self._template = env.from_string(self.chat_template)
        self._specials = _special_tokens(backend)
        self._special_re = _alternation(self._specials)
        self._plain: tokenizers.Tokenizer | None = None  # built on first need: see `_plain_backend`
        self._plain_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def max_token_chars(self) -> int:
        """No token stands for more characters of input than this: a text longer than `n` times this
        has more than `n` tokens, which a caller can tell without tokenizing it."""
        longest = max(len(t) for t in self.backend.get_vocab(with_added_tokens=True))
        # a normalizer may compose several characters into one (NFC): allow for it
        return longest * (1 if self.backend.normalizer is None else 4)

    def encode(self, text: str, add_bos: bool | None = None, *, special: bool = True) -> list[int]:
        """Token ids of `text`. `special`: text spelling a special token becomes that token (as in a
        raw prompt written with its own markup); False: it is plain text like any other."""
        ids = self._encode(text, self.backend if special else self._plain_backend())
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    @staticmethod
    def _encode(text: str, backend: tokenizers.Tokenizer) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a long text tokenized in one
        # thread does not stall the others, such as a server's event loop
        return backend.encode_batch([text], add_special_tokens=False)[0].ids

    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special tokens' text as plain text."""
        with self._plain_lock:
            if self._plain is None:
                plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise LeapError("messages: each message needs a 'role' and a string 'content'")
        bos = self.token(self.bos_id) if self.bos_id is not None else ""
        eos = self.token(min(self.eos_ids)) if self.eos_ids else ""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
        except jinja2.TemplateError as exc:
            raise LeapError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's token ids for `messages`: special tokens where the template writes them,
        message text (content, role, name) always plain. The template writes BOS itself if wanted."""
        found = self._special_re is not None and any(
            self._special_re.search(v) for m in messages if isinstance(m, dict) for v in _strings(m)
        )
        if not found or self._special_re is None:  # no special text in them: the rendered text as it is
            return self.encode(self.render_chat(messages), add_bos=False)
        return self._encode_marked(messages, self._special_re)

    def _encode_marked(self, messages: list[dict], special_re: re.Pattern) -> list[int]:
        """Special-token text in the messages is swapped for markers that no template or message
        contains, the template renders, its own special tokens become ids, and the rest (markers back
        to their text) is encoded as plain text."""
        spelled: list[str] = []
        mark = _free_char(self.chat_template, messages)

        def hide(match: re.Match) -> str:
            spelled.append(match.group(0))
            return f"{mark}{len(spelled) - 1}{mark}"

        hidden = [
            {k: special_re.sub(hide, v) if isinstance(v, str) else v for k, v in m.items()}
            if isinstance(m, dict)
            else m  # render_chat names what is wrong with it
            for m in messages
        ]
        rendered = self.render_chat(hidden)
        unmark = re.compile(f"{mark}(\\d+){mark}")
        ids: list[int] = []
        for i, part in enumerate(special_re.split(rendered)):
            if i % 2:  # a special token the template wrote
                ids.append(self._specials[part])
            elif part:
                text = unmark.sub(lambda m: spelled[int(m.group(1))], part)
                ids += self._encode(text, self._plain_backend())
        return ids

    @staticmethod
    def from_gguf_metadata(meta: dict) -> Tokenizer:
        backend = _gguf_backend(meta)
        tokens = meta["tokenizer.ggml.tokens"]
        eos = {meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}
        template = meta.get("tokenizer.chat_template")
        eos |= _end_of_turn_ids(tokens, template)
        return Tokenizer(
            backend,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=eos,
            chat_template=template,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @staticmethod
    def from_hf_folder(folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LeapError(f"{folder}: no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(path))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        vocab = backend.get_vocab(with_added_tokens=True)
        bos_text, eos_text = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        bos = vocab.get(bos_text) if bos_text is not None else None
        eos = {vocab[eos_text]} if eos_text in vocab else set()
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        size = backend.get_vocab_size(with_added_tokens=True)
        tokens = [t or "" for t in (backend.id_to_token(i) for i in range(size))]  # "" for an unused id
        eos |= _end_of_turn_ids(tokens, template)
        return Tokenizer(
            backend,
            bos_id=bos,
            eos_ids=eos,
            chat_template=template,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )


def _special_tokens(backend: tokenizers.Tokenizer) -> dict[str, int]:
    """The special (control) tokens' text -> id. User-defined added tokens (a GGUF's token type 4,
    `special: false` in tokenizer.json) are ordinary words of the vocabulary and stay out."""
    return {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}


def _alternation(words: dict[str, int]) -> re.Pattern | None:
    """One group matching any of `words`, longest first (leftmost-longest, as the backend matches)."""
    if not words:
        return None
    return re.compile("(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")")


def _strings(message: dict) -> list[str]:
    return [v for v in message.values() if isinstance(v, str)]


def _free_char(template: str, messages: list[dict]) -> str:
    """A private-use character found in neither the template nor any message."""
    taken = set(template).union(*(set(v) for m in messages for v in _strings(m)))
    return next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)


def _end_of_turn_ids(tokens: list[str], template: str | None) -> set[int]:
    """The end-of-turn marker that the chat template writes after each message is a stop token too."""
    template = template or _CHATML
    return {i for i, t in enumerate(tokens) if t in _END_OF_TURN and t in template}


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)
