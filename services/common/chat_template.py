"""Chat templates: the model's own Jinja template (tokenizer_config.json), rendered as Hugging Face
transformers renders it, in a sandbox (a template is data from a model file, not trusted code).

Workers render messages to serve them; routers render them too, to hash the prompt's blocks for
KV-aware routing. Both use this module, so the tokens they hash are the tokens the worker computes.
The template is compiled once per ChatTemplate, not per request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import InvalidArgument

_ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str):
    raise InvalidArgument(f"the chat template refused the messages: {message}")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str
    _compiled: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        path = Path(folder) / "tokenizer_config.json"
        if not path.is_file():
            return None
        return cls.from_config(json.loads(path.read_text()))

    @classmethod
    def from_config(cls, config: dict) -> ChatTemplate | None:
        """From the contents of tokenizer_config.json; None when it holds no template."""
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidArgument("messages must hold at least one message")
        for index, message in enumerate(messages):
            if message.get("role") not in _ROLES:
                raise InvalidArgument(
                    f"message {index} has role {message.get('role')!r}; use one of {', '.join(_ROLES)}"
                )
        try:
            return self._template().render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as error:
            raise InvalidArgument(f"the chat template failed to render: {error}") from None


    def _template(self) -> jinja2.Template:
        template = self._compiled.get("template")
        if template is None:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise_exception
            template = self._compiled["template"] = environment.from_string(self.source)
        return template


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""
