"""Open-Assistant message-tree exports (`*.trees.jsonl.gz`, one tree per line).

A tree is kept when `tree_state == "ready_for_export"`, its root has a truthy `review_result` and
the root's `lang` is in the `lang` list. Its threads are the root-to-leaf paths of at least two
messages in which no message is deleted or synthetic. With `top_k`, a thread is rejected when one
of its assistant messages has `rank >= top_k`, or has no rank while its parent has several
replies. A trailing prompter message is dropped; such a thread is taken only through the parent's
first reply, so several unanswered follow-ups do not repeat the same conversation. A selected
thread whose roles do not alternate (prompter first) is a bad record, where Open-Assistant's
loader fails an assertion.

A kept tree whose threads are all rejected is still a valid record (an empty list of
conversations): Open-Assistant's loader keeps it in the tree list it splits, so it counts when
the val share is sized. Train and val are split by tree (`val_split`); `fraction` then samples
the train threads and `max_val_set` caps the val threads, as Open-Assistant samples and caps the
flattened thread lists its loader returns (see `data.pretokenize.select_threads`).
"""

from pathlib import Path

from data.chat import Conversation, Role
from data.errors import BadRecord
from data.sources.files import decode_line

_ROLES = {"prompter": Role.USER, "assistant": Role.ASSISTANT}


def _check_message(m, location: str, where: str, top_k: int | None) -> list:
    if not isinstance(m, dict):
        raise BadRecord(location, f"{where}: expected a message object, found {type(m).__name__}")
    if not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
        raise BadRecord(
            location, f"{where}: role must be 'prompter' or 'assistant', found {m.get('role')!r}"
        )
    if not isinstance(m.get("text"), str):
        raise BadRecord(location, f"{where}: message text must be a string")
    rank = m.get("rank")
    # Compared with top_k only: without it, a malformed rank is as harmless as before.
    if top_k is not None and rank is not None and not isinstance(rank, int | float):
        raise BadRecord(location, f"{where}: 'rank' must be a number or null, found {rank!r}")
    replies = m.get("replies") or []
    if not isinstance(replies, list):
        raise BadRecord(location, f"{where}: 'replies' must be a list")
    return replies


def _thread_ok(thread: list[dict], top_k: int | None) -> bool:
    for i, m in enumerate(thread):
        if m.get("deleted") or m.get("synthetic"):
            return False
        if top_k is not None and m["role"] == "assistant":
            rank = m.get("rank")
            if rank is None:
                if i > 0 and len(thread[i - 1].get("replies") or []) > 1:
                    return False
            elif rank >= top_k:
                return False
    return True


def tree_threads(root: dict, location: str, top_k: int | None) -> list[list[dict]]:
    """The selected root-to-leaf threads of one tree (trailing prompter dropped)."""
    threads = []
    # Iterative depth-first walk (trees can be deep), children in their stored order.
    stack: list[tuple[dict, list[dict], str]] = [(root, [], "prompt")]
    while stack:
        node, parents, where = stack.pop()
        replies = _check_message(node, location, where, top_k)
        thread = parents + [node]
        if not replies:
            if (
                len(thread) >= 2
                and (
                    node["role"] == "assistant" or (parents[-1].get("replies") or [None])[0] is node
                )
                and _thread_ok(thread, top_k)
            ):
                threads.append(thread[:-1] if node["role"] == "prompter" else thread)
            continue
        for k in range(len(replies) - 1, -1, -1):
            stack.append((replies[k], thread, f"{where}.replies[{k}]"))
    return [t for t in threads if len(t) >= 2]


def _check_alternating(thread: list[dict], location: str) -> None:
    """Open-Assistant asserts that a selected thread alternates prompter, assistant, ... (a
    prompter replying to a prompter is not a conversation it can train on)."""
    for i, m in enumerate(thread):
        want = "prompter" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(
                location,
                f"thread {' > '.join(x['role'] for x in thread)}: message {i + 1} has role "
                f"{m['role']!r}, expected {want!r} (roles must alternate, starting with the "
                "prompter); fix or remove the tree",
            )


def convert_tree(obj, location: str, path: Path, opts: dict) -> list[Conversation] | str:
    tree = decode_line(obj, location) if isinstance(obj, bytes) else obj
    if not isinstance(tree, dict):
        raise BadRecord(location, f"expected a message tree object, found {type(tree).__name__}")
    if "prompt" not in tree and "message_id" in tree:
        raise BadRecord(
            location,
            "this is a message, not a message tree: the file is a messages export (one message a "
            "line); point input_file_path at the trees export (*.trees.jsonl.gz)",
        )
    for key in ("tree_state", "prompt"):
        if key not in tree:
            raise BadRecord(
                location, f"missing key {key!r} of a message tree (found {sorted(tree)})"
            )
    root = tree["prompt"]
    if not isinstance(root, dict):
        raise BadRecord(location, "'prompt' must be a message object")
    if tree["tree_state"] != "ready_for_export":
        return "tree_state"
    if not root.get("review_result"):
        return "review_result"
    langs = opts["lang"]
    lang = root.get("lang")
    if langs is not None and lang is not None and not isinstance(lang, str):
        raise BadRecord(location, f"prompt: 'lang' must be a language code, found {lang!r}")
    if langs is not None and lang not in langs:
        return "lang"
    threads = tree_threads(root, location, opts["top_k"])
    for t in threads:
        _check_alternating(t, location)
    # No thread left is not a drop: the tree still counts when the split is sized.
    return [
        Conversation(turns=[(_ROLES[m["role"]], m["text"]) for m in t], lang=lang) for t in threads
    ]
