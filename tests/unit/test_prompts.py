"""GIVEN a context size WHEN a prompt and a completion are sized THEN the budget is what fits, and
anything that cannot fit is `context_length_exceeded` naming the field; a model without a chat
template gets the plain format and its stop string."""

from __future__ import annotations

import pytest

from handler.engine.chat_template import ChatTemplate
from handler.engine.prompts import PLAIN_PROMPT_STOPS, completion_budget, render_chat
from handler.errors import ContextLengthExceeded, InvalidRequest


def test_budget_is_the_room_left_capped():
    assert completion_budget(1024, 4096, 10, None, "prompt") == 1014
    assert completion_budget(1024, 100, 10, None, "prompt") == 100
    assert completion_budget(1024, 4096, 10, 50, "prompt") == 50


@pytest.mark.parametrize(("prompt", "max_tokens"), [(1024, None), (2000, None), (10, 1024)])
def test_what_cannot_fit_is_context_length_exceeded(prompt, max_tokens):
    with pytest.raises(ContextLengthExceeded) as raised:
        completion_budget(1024, 4096, prompt, max_tokens, "messages")
    assert raised.value.param == "messages"
    assert raised.value.code == "context_length_exceeded"


def fake_tokenize(text: str, add_bos: bool, special: bool) -> list[int]:
    return [len(text), int(add_bos), int(special)]


def test_no_template_uses_the_plain_format_and_its_stop():
    messages = [{"role": "user", "content": "hi"}]
    tokens, stops = render_chat(None, messages, fake_tokenize)
    assert tokens == [len("user: hi\nassistant:"), 1, 0]
    assert stops == PLAIN_PROMPT_STOPS


def test_template_renders_with_special_tokens_parsed():
    template = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", "", ""
    )
    tokens, stops = render_chat(template, [{"role": "user", "content": "hi"}], fake_tokenize)
    assert tokens == [len("<user>hi"), 1, 1]
    assert stops == ()


def test_a_template_that_rejects_the_messages_is_a_400():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", "", "")
    with pytest.raises(InvalidRequest) as raised:
        render_chat(template, [{"role": "user", "content": "hi"}], fake_tokenize)
    assert raised.value.param == "messages"
    assert "roles must alternate" in raised.value.message
