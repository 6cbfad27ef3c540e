"""Chat templates of the LLaVA-style families: the one every HF Llava directory this project writes
carries (:data:`DEFAULT_CHAT_TEMPLATE`), LLaVA-1.5's list-only original, and which template a processor uses.
"""

from __future__ import annotations

import re
from typing import Any

# LLaVA-1.5's template as llava-hf ships it ("USER: <image>\n... ASSISTANT: ..."): it reads list content only,
# so string content (what lmms-eval's llava_hf wrapper and most chat code send) renders as nothing.
LLAVA_HF_LIST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The same template for list content, and string content rendered the same way: a message
# {"content": "<image>\nQ"} gives exactly what {"content": [{"type": "image"}, {"type": "text", "text": "Q"}]}
# gives. Every HF Llava directory this project writes carries it (``llava_chat_template``).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% if message['content'] is string %}{% if message['role'] != 'assistant' %}"
    "{{ message['content'] + ' ' }}{% else %}{% generation %}{{ message['content'] + ' ' }}{% endgeneration %}"
    "{% endif %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _canonical(template: str) -> str:
    """A template without Jinja comments and whitespace, to recognise copies that differ only in those."""
    return re.sub(r"\s+", "", re.sub(r"\{#.*?#\}", "", template, flags=re.S))


def llava_chat_template(template: str | None) -> str:
    """The chat template an HF Llava directory gets: :data:`DEFAULT_CHAT_TEMPLATE` in place of none or of
    LLaVA-1.5's list-only one (which it renders identically for list content); any other template is kept."""
    if not isinstance(template, str):  # a processor may hold a dict of named templates: keep those
        return template or DEFAULT_CHAT_TEMPLATE
    if not template or _canonical(template) == _canonical(LLAVA_HF_LIST_TEMPLATE):
        return DEFAULT_CHAT_TEMPLATE
    return template


def chat_template(processor: Any) -> str:
    """The processor's (or its tokenizer's) chat template, else :data:`DEFAULT_CHAT_TEMPLATE`."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return template
    return DEFAULT_CHAT_TEMPLATE
