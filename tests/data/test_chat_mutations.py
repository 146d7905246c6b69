"""ChatML role handling pinned after a mutation-testing pass: each test kills a mutant of
data/chat.py that test_chat.py let through."""

import pytest

from data.chat import Conversation, Role, as_role, format_text, render_prompt


def test_role_names_are_read_with_surrounding_whitespace():
    """Role names from source files may carry spaces or a newline (" Assistant\\n"): they name
    the role all the same (a stray space must not turn an assistant turn into an error)."""
    assert as_role(" Assistant\n") == Role.ASSISTANT and as_role("\tprompter ") == Role.USER


@pytest.mark.parametrize("value", [4, -1, 6])
def test_role_ids_outside_the_four_roles_are_refused(value):
    """Only ids 0..3 are roles; another id is an error, not wrapped onto a valid role (id 4
    becoming SYSTEM would silently change which tokens get loss)."""
    with pytest.raises(ValueError):
        as_role(value)


def test_an_explicit_empty_system_conflicts_with_the_messages_system(tok):
    """render_prompt(system="") asks for no system message: messages that carry one are a
    conflict (refused), not silently rendered with theirs."""
    with pytest.raises(ValueError, match="different system"):
        render_prompt([("system", "A"), ("user", "q")], tok, system="")
    assert render_prompt([("user", "q")], tok, system="") == render_prompt([("user", "q")], tok)


def test_conversation_turns_may_name_their_roles():
    """Turns given to Conversation directly may carry role names or ids: rendering reads them
    with as_role, as from_messages does."""
    conv = Conversation(turns=[("user", "hi"), (2, "ok")])
    assert (
        format_text(conv) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )
