"""A generation request's prompt as token ids, computed the same way wherever it is needed.

The worker tokenizes a prompt (with the tokenizer's own special-token rules) or renders chat
messages with the model's template and tokenizes the result without adding special tokens again
(the template writes them). A router that routes by cached prefix computes the same token ids to
hash their blocks, and forwards them so the worker need not tokenize again: both call this module.
"""

from __future__ import annotations

from services.common.chat_template import ChatTemplate
from services.common.errors import InvalidArgument


def prompt_token_ids(tokenizer, chat_template: ChatTemplate | None, model_name: str, *,
                     prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
    if messages is not None:
        if chat_template is None:
            raise InvalidArgument(f"model '{model_name}' has no chat template: send a prompt instead")
        return tokenizer.encode(chat_template.render(messages), add_special_tokens=False).ids
    return tokenizer.encode(prompt or "", add_special_tokens=True).ids
