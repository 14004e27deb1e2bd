"""Chat messages -> prompt text, with the model's own chat template in Jinja2's sandbox.

The template comes from `tokenizer_config.json` (`chat_template`: a string, or a list of named
templates of which "default" is used), as in transformers. A template is code supplied with a
model, so it runs in an `ImmutableSandboxedEnvironment`: no attribute access to Python internals,
no mutation of the messages. The rendered text already holds the special tokens the template
wants (e.g. `<s>`), so it is encoded without adding any (transformers does the same).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool", "developer")


class TemplateError(ValueError):
    """The template itself fails (raise_exception, a syntax error): the caller's messages are refused."""


def _raise_exception(message: str) -> None:
    # Templates call this to refuse a conversation (e.g. roles not alternating).
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"{origin or 'chat template'}: not a valid Jinja2 template ({exc})") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text; TemplateError when the template refuses the conversation."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"the chat template tried an unsafe operation: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed on these messages: {exc}") from exc

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The model's template, or None when its tokenizer_config.json has none."""
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        source = config.get("chat_template") if isinstance(config, dict) else None
        if source is None:
            return None
        if isinstance(source, list):  # [{"name": ..., "template": ...}], as transformers saves several
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if source is None:
                raise ValueError(f"{path}: chat_template lists no template named 'default'")
        if not isinstance(source, str):
            raise ValueError(f"{path}: chat_template must be a string, got {type(source).__name__}")
        return cls(
            source,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            origin=str(path),
        )


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
