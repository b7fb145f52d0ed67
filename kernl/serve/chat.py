"""Chat messages to a prompt with the model's chat template (Jinja), as transformers' apply_chat_template renders
it, without importing transformers.

The template comes from the tokenizer config ("chat_template": a string, or a list of named templates of which
"default" is used) or from a file the server is given. It is rendered in Jinja's immutable sandbox (a bundle is
data: its template may read the messages but not reach Python objects), with the settings and helpers that
transformers gives templates: trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception, strftime_now.
Jinja2 is a dependency of torch, so it is there wherever kernl runs.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kernl.errors import InputError, KernlError

SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def template_source(config: dict[str, Any]) -> str | None:
    """The chat template of a tokenizer config, or None when it has none."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _special(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """render(messages) -> the prompt text the model was trained on, ending with the assistant's turn opened."""

    def __init__(self, source: str, config: dict[str, Any] | None = None) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InputError(f"messages: {message}")

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                   sort_keys: bool = False) -> str:  # fmt: skip
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)  # fmt: skip

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._errors = TemplateError
        try:
            self.template = env.from_string(source)
        except TemplateError as err:
            raise KernlError(f"the chat template does not parse: {err}") from None
        config = config or {}
        self.tokens = {name: _special(config.get(name)) for name in SPECIAL}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for messages ([{"role": ..., "content": ...}]); InputError when the template refuses them."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens, **extra
            )
        except InputError:
            raise
        except (self._errors, TypeError, ValueError, KeyError, AttributeError) as err:
            raise InputError(f"messages: the chat template cannot render them ({type(err).__name__}: {err})") from None
