import pytest

from data.chat import Conversation, Role, as_role, format_text, render, render_many, render_prompt


def _conv() -> Conversation:
    return Conversation(
        turns=[
            (Role.USER, "How many pens does Ana have?"),
            (Role.CONTEXT, "Ana has 3 pens."),
            (Role.ASSISTANT, "Ana has 3 pens."),
            (Role.USER, "And twice that?"),
            (Role.ASSISTANT, "3 * 2 = 6."),
        ],
        system="Answer briefly.",
    )


def test_chatml_text():
    assert format_text(_conv()) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHow many pens does Ana have?<|im_end|>\n"
        "<|im_start|>context\nAna has 3 pens.<|im_end|>\n"
        "<|im_start|>assistant\nAna has 3 pens.<|im_end|>\n"
        "<|im_start|>user\nAnd twice that?<|im_end|>\n"
        "<|im_start|>assistant\n3 * 2 = 6.<|im_end|>\n"
    )


def test_render_roles_per_token(tok):
    conv = _conv()
    ids, roles = render(conv, tok)
    assert len(ids) == len(roles)
    # Per-turn tokenization equals tokenizing the whole text (every turn ends in <|im_end|>\n).
    assert ids == tok.encode(format_text(conv))
    expected_roles = []
    for text, role in [
        ("<|im_start|>system\nAnswer briefly.<|im_end|>\n", 0),
        ("<|im_start|>user\nHow many pens does Ana have?<|im_end|>\n", 1),
        ("<|im_start|>context\nAna has 3 pens.<|im_end|>\n", 3),
        ("<|im_start|>assistant\nAna has 3 pens.<|im_end|>\n", 2),
        ("<|im_start|>user\nAnd twice that?<|im_end|>\n", 1),
        ("<|im_start|>assistant\n3 * 2 = 6.<|im_end|>\n", 2),
    ]:
        expected_roles += [role] * len(tok.encode(text))
    assert roles == expected_roles
    # The assistant's header and its closing <|im_end|>\n are assistant tokens.
    first_assistant = roles.index(2)
    assert ids[first_assistant] == tok.im_start_id
    assert tok.decode(ids[first_assistant : first_assistant + 3]).startswith(
        "<|im_start|>assistant"
    )
    assert roles[-1] == 2 and tok.decode(ids[-3:]).endswith("<|im_end|>\n")


def test_render_many_matches_render(tok):
    convs = [
        _conv(),
        [("user", "hi"), ("assistant", "hello")],
        [{"role": "prompter", "content": "x"}],
    ]
    assert render_many(convs, tok) == [render(c, tok) for c in convs]


def test_render_prompt_for_generation(tok):
    ids = render_prompt([("user", "What is 2 + 2?")], tok, system="Be brief.")
    text = tok.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    # A leading system message in the messages works the same way.
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    assert render_prompt(msgs, tok) == ids


def test_render_prompt_conflicting_system(tok):
    with pytest.raises(ValueError, match="different system"):
        render_prompt([("system", "A"), ("user", "q")], tok, system="B")


def test_roles():
    assert [int(r) for r in Role] == [0, 1, 2, 3]
    assert (
        as_role("prompter") == Role.USER
        and as_role("Assistant") == Role.ASSISTANT
        and as_role(3) == Role.CONTEXT
    )
    with pytest.raises(ValueError, match="unknown role"):
        as_role("bot")


def _turn_ids(tok, role: str, text: str) -> list[int]:
    """Ids of one ChatML turn, built from its parts (not by encoding the whole turn string)."""
    return [tok.im_start_id] + tok.encode(f"{role}\n{text}") + [tok.im_end_id] + tok.encode("\n")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "trailing spaces and newlines  \n\n",
        "  leading spaces",
        "Grüße, ¿qué tal? 日本語 ☃ \u00a0 e\u0301",
        "literal <|im_start|>user\nfake turn<|im_end|>\n and </s> <PAD>",
        "<|im_end|>",
        "x" * 20_000 + " long " * 5_000,
    ],
)
def test_render_edge_texts(tok, text):
    conv = Conversation(turns=[(Role.USER, text), (Role.ASSISTANT, text)], system=text or None)
    ids, roles = render(conv, tok)
    assert ids == tok.encode(format_text(conv))
    assert tok.decode(ids) == format_text(conv)
    head = [] if not text else _turn_ids(tok, "system", text)
    user, assistant = _turn_ids(tok, "user", text), _turn_ids(tok, "assistant", text)
    assert ids == head + user + assistant
    assert roles == [0] * len(head) + [1] * len(user) + [2] * len(assistant)
    # The loss mask (assistant tokens) is exactly the assistant turn: its header
    # `<|im_start|>assistant\n`, its text (literal specials included) and `<|im_end|>\n`.
    mask = [r == Role.ASSISTANT for r in roles]
    start = mask.index(True)
    assert all(mask[start:]) and not any(mask[:start])
    assert ids[start] == tok.im_start_id
    assert tok.decode(ids[start:]) == f"<|im_start|>assistant\n{text}<|im_end|>\n"
    assert ids[-len(tok.encode("\n")) - 1] == tok.im_end_id


def test_literal_specials_in_text_become_special_ids(tok):
    """Megatron-LLM (the seed's pretokenizer) split every special token out of the text, the ones
    a user typed included; so do we, each carrying its turn's role id."""
    ids, roles = render([("user", "a <|im_end|> b")], tok)
    inner = [i for i, r in zip(ids, roles) if i == tok.im_end_id]
    assert len(inner) == 2 and set(roles) == {int(Role.USER)}


def test_empty_system_message_is_not_rendered(tok):
    with_empty = Conversation.from_messages([("system", ""), ("user", "hi")])
    assert format_text(with_empty) == "<|im_start|>user\nhi<|im_end|>\n"
    assert render_prompt([("user", "hi")], tok, system="") == render_prompt([("user", "hi")], tok)


def test_explicit_system_keeps_a_leading_system_turn_as_a_turn():
    """`from_messages(..., system=...)`: an explicit system message wins and a leading system
    turn stays a turn of its own (rendered after it), not silently replacing the explicit one."""
    conv = Conversation.from_messages([("system", "from turns"), ("user", "hi")], system="given")
    assert conv.system == "given"
    assert conv.turns == [(Role.SYSTEM, "from turns"), (Role.USER, "hi")]
    assert format_text(conv) == (
        "<|im_start|>system\ngiven<|im_end|>\n"
        "<|im_start|>system\nfrom turns<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_turn_text_is_rendered_verbatim():
    """Leading/trailing spaces and newlines of a turn are part of the trained text: rendering
    must not strip or normalise them (the tokens, and so the labels, would change)."""
    conv = Conversation.from_messages(
        [{"role": "user", "content": "  hi\n"}, {"role": "assistant", "content": "\n ok  "}]
    )
    assert conv.turns == [(Role.USER, "  hi\n"), (Role.ASSISTANT, "\n ok  ")]
    assert format_text(conv) == (
        "<|im_start|>user\n  hi\n<|im_end|>\n<|im_start|>assistant\n\n ok  <|im_end|>\n"
    )
