"""A thin wrapper over ``tokenizers.Tokenizer`` with streaming-safe incremental decoding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

# Tokens of context re-decoded before new ids: enough to hold any partial UTF-8 character (4 bytes)
# plus a word boundary, so a window decode agrees with decoding the whole sequence.
_DELTA_WINDOW = 8
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Encode/decode text; ``decode_delta`` yields the text that new ids add to a stream."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        source: str = "<tokenizer>",
    ) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.source = source

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (and bos/eos names from ``tokenizer_config.json`` if present)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        bos = eos = None
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from exc
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object")
            bos = _token_id(tok, cfg.get("bos_token"), "bos_token", cfg_path)
            eos = _token_id(tok, cfg.get("eos_token"), "eos_token", cfg_path)
        return cls(tok, bos_token_id=bos, eos_token_id=eos, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode: expected a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of each id list, in one call into the tokenizer library."""
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def decode_delta(
        self,
        prev_ids: Sequence[int],
        new_ids: Sequence[int],
        *,
        final: bool = False,
        skip_special_tokens: bool = True,
    ) -> str:
        """The text ``new_ids`` add after ``prev_ids`` in a stream.

        Bytes of a character split across tokens are held back (the decode ends in U+FFFD) until the
        token completing it arrives, so concatenating the deltas of successive calls (each call's
        ``prev_ids`` being all ids before its ``new_ids``) gives the text of the whole sequence;
        ``final=True`` flushes whatever is still held back.
        """
        window = list(prev_ids[-_DELTA_WINDOW:]) if prev_ids else []
        before = self._stable(self.decode(window, skip_special_tokens=skip_special_tokens), False)
        after = self._stable(
            self.decode(window + list(new_ids), skip_special_tokens=skip_special_tokens), final
        )
        # A decoder may rewrite earlier text (rare); only what lies past the old length is new.
        return after[len(before) :]

    @staticmethod
    def _stable(text: str, final: bool) -> str:
        return text if final else text.rstrip(_REPLACEMENT)


def _token_id(tok: _HFTokenizer, value: Any, name: str, path: Path) -> int | None:
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise ValueError(f"{path}: {name} must be a string or an object with 'content', got {value!r}")
    token_id = tok.token_to_id(content)
    if token_id is None:
        raise ValueError(f"{path}: {name} {content!r} is not in the tokenizer's vocabulary")
    return token_id
