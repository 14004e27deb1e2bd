"""Chat templates: read from tokenizer_config.json, rendered in Jinja2's sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.serving.chat_template import ChatTemplate, TemplateError
from lorafleet.worker.demo_assets import DEMO_CHAT_TEMPLATE, ensure_chat_template

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def _model_dir(tmp_path: Path, **config) -> Path:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", **config})
    )
    return tmp_path


def test_demo_template_renders_with_bos_eos_and_generation_prompt(tmp_path: Path) -> None:
    template = ChatTemplate.from_dir(_model_dir(tmp_path, chat_template=DEMO_CHAT_TEMPLATE))
    assert template is not None
    expected = "<s><|system|>\nbe brief</s>\n<|user|>\nhi</s>\n"
    assert template.render(CHAT) == expected + "<|assistant|>\n"
    assert template.render(CHAT, add_generation_prompt=False) == expected


def test_named_templates_pick_default_and_errors_name_the_file(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    assert ChatTemplate.from_dir(_model_dir(tmp_path, chat_template=named)).render(CHAT) == "D2"
    with pytest.raises(ValueError, match="default"):
        ChatTemplate.from_dir(_model_dir(tmp_path, chat_template=[{"name": "x", "template": "T"}]))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        ChatTemplate.from_dir(_model_dir(tmp_path, chat_template="{% for %}"))
    assert ChatTemplate.from_dir(_model_dir(tmp_path)) is None
    assert ChatTemplate.from_dir(tmp_path / "missing") is None


def test_sandbox_refuses_python_internals_and_template_errors_are_template_errors() -> None:
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="unsafe"):
        escape.render(CHAT)
    mutate = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages|length }}")
    with pytest.raises(TemplateError):
        mutate.render(CHAT)
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="user first"):
        strict.render(CHAT)


def test_ensure_chat_template_upgrades_an_old_demo(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    assert ensure_chat_template(model) is True
    assert ensure_chat_template(model) is False
    assert ChatTemplate.from_dir(model).render(CHAT[1:]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
