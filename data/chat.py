"""ChatML rendering: conversations -> (token ids, role ids).

One string per turn, `<|im_start|>{role}\\n{text}<|im_end|>\\n`, each tokenized on its own (so
the ids are the same as tokenizing the joined text: every turn ends with a special token and a
newline). Every token of a turn carries the turn's role id, so the assistant's own header and its
closing `<|im_end|>\\n` count as assistant tokens, as in Open-Assistant's pretokenizer.

A turn's text is not escaped: a literal `<|im_start|>`, `<|im_end|>`, `</s>`, ... in it becomes
that special id (with the turn's role id), as Megatron-LLM's tokenizer made it for the seed's
data, and an empty text still gets its header and `<|im_end|>\\n`. The system message is
rendered only when it is not empty (Open-Assistant's `format_sft_entry`).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from data.tokenizer import IM_END, IM_START, Tokenizer


class Role(IntEnum):
    """Role ids of the `-role` files."""

    SYSTEM = 0
    USER = 1  # Open-Assistant's "prompter"
    ASSISTANT = 2
    CONTEXT = 3


ROLE_NAMES = {
    Role.SYSTEM: "system",
    Role.USER: "user",
    Role.ASSISTANT: "assistant",
    Role.CONTEXT: "context",
}
_ROLE_BY_NAME = {name: role for role, name in ROLE_NAMES.items()} | {"prompter": Role.USER}


def as_role(value: "Role | int | str") -> Role:
    """Role from an id or a name (system, user/prompter, assistant, context)."""
    if isinstance(value, str):
        role = _ROLE_BY_NAME.get(value.strip().lower())
        if role is None:
            raise ValueError(
                f"unknown role {value!r}: expected system, user, prompter, assistant or context"
            )
        return role
    return Role(int(value))


@dataclass(slots=True)
class Conversation:
    """An optional system message, then (role, text) turns; `lang` when the source knows it."""

    turns: list[tuple[Role, str]] = field(default_factory=list)
    system: str | None = None
    lang: str | None = None

    @classmethod
    def from_messages(cls, messages: Iterable, system: str | None = None) -> "Conversation":
        """From (role, text) pairs or {"role", "content"} dicts; a leading system turn becomes
        the system message."""
        turns = []
        for m in messages:
            role, text = (m["role"], m["content"]) if isinstance(m, dict) else m
            turns.append((as_role(role), text))
        if turns and turns[0][0] == Role.SYSTEM and system is None:
            system = turns.pop(0)[1]
        return cls(turns=turns, system=system)


def turn_strings(conversation: "Conversation | Sequence") -> tuple[list[str], list[int]]:
    """ChatML string and role id of each turn (the system message first, if any)."""
    if not isinstance(conversation, Conversation):
        conversation = Conversation.from_messages(conversation)
    texts, roles = [], []
    if conversation.system:
        texts.append(f"{IM_START}system\n{conversation.system}{IM_END}\n")
        roles.append(int(Role.SYSTEM))
    for role, text in conversation.turns:
        role = as_role(role)
        texts.append(f"{IM_START}{ROLE_NAMES[role]}\n{text}{IM_END}\n")
        roles.append(int(role))
    return texts, roles


def format_text(conversation: "Conversation | Sequence") -> str:
    """The whole conversation as one ChatML string."""
    return "".join(turn_strings(conversation)[0])


def render_many(
    conversations: Sequence["Conversation | Sequence"], tokenizer: Tokenizer
) -> list[tuple[list[int], list[int]]]:
    """`render` of many conversations with one tokenizer call."""
    per_conv = [turn_strings(c) for c in conversations]
    encoded = tokenizer.encode_batch([t for texts, _ in per_conv for t in texts])
    out = []
    k = 0
    for _, roles in per_conv:
        ids: list[int] = []
        role_ids: list[int] = []
        for role in roles:
            turn = encoded[k]
            k += 1
            ids.extend(turn)
            role_ids.extend([role] * len(turn))
        out.append((ids, role_ids))
    return out


def render(
    conversation: "Conversation | Sequence", tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """(token ids, role ids) of one conversation, equal length."""
    return render_many([conversation], tokenizer)[0]


def render_prompt(
    messages: "Conversation | Sequence", tokenizer: Tokenizer, system: str | None = None
) -> list[int]:
    """Token ids of a generation prompt: the turns, then `<|im_start|>assistant\\n`."""
    conversation = (
        messages if isinstance(messages, Conversation) else Conversation.from_messages(messages)
    )
    if system is not None:
        if conversation.system is not None and conversation.system != system:
            raise ValueError("render_prompt: the messages already carry a different system message")
        conversation = Conversation(turns=conversation.turns, system=system, lang=conversation.lang)
    texts, _ = turn_strings(conversation)
    encoded = tokenizer.encode_batch(texts + [f"{IM_START}assistant\n"])
    return [i for turn in encoded for i in turn]
