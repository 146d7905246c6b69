"""Write the bundled sample datasets and train the sample tokenizer, deterministically.

    python -m data.samples.generate [--out data/samples] [--tokenizer data/assets/sample_sp.model]

Everything here is made up for this project (no real dataset is copied): arithmetic with correct
answers, string and list tasks, short Python functions, reading a sentence of context, in the
column layouts of the datasets the seed mixes (megacode2, orca-chat, dolly15k_multilingual,
oa_leet10k, an Open-Assistant tree export) plus the generic `chat` JSONL. Answers follow a few
fixed patterns, so a tiny model can learn them within minutes. A few rows exercise the filters
(a blank field, a phrase of the word filter, a language outside the keep list, trees that are not
ready for export, deleted or synthetic messages, ranks beyond top_k).
"""

import argparse
import gzip
import io
import json
import random
from pathlib import Path

SEED = 20230723
HERE = Path(__file__).resolve().parent

WORDS = (
    "apple river planet garden window rocket silver forest pencil orange castle bridge "
    "yellow summer winter dragon violet market camera butter monkey ticket spring cloud "
    "stone green honey light table mirror"
).split()
NAMES = "Anna Ben Clara David Emma Felix Greta Hugo Ida Jonas Lena Max Nora Otto Paula".split()
ITEMS = {
    "en": ["apples", "books", "coins", "pencils", "stamps", "marbles"],
    "de": ["Äpfel", "Bücher", "Münzen", "Stifte", "Briefmarken", "Murmeln"],
    "es": ["manzanas", "libros", "monedas", "lápices", "sellos", "canicas"],
    "fr": ["pommes", "livres", "pièces", "crayons", "timbres", "billes"],
    "it": ["mele", "libri", "monete", "matite", "francobolli", "biglie"],
}
SYSTEMS = [
    "You are a helpful assistant. Answer briefly and correctly.",
    "You are a careful math tutor. Show the steps.",
    "You are an assistant that answers in one sentence.",
    "You are a Python expert. Keep code short.",
]


# ---------------------------------------------------------------------------------------------
# Task generators: each returns (question, answer) with a correct answer in a fixed pattern.


def t_arith(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op = r.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        b = r.randint(2, 12)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = r.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."])
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} = {value}. The answer is {value}."


def t_two_step(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(2, 20), r.randint(2, 9), r.randint(1, 50)
    return (
        f"Multiply {a} by {b} and then add {c}.",
        f"First, {a} * {b} = {a * b}. Then {a * b} + {c} = {a * b + c}. The answer is {a * b + c}.",
    )


def t_reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f'Reverse the word "{w}".', f'The word "{w}" reversed is "{w[::-1]}".'


def t_upper(r: random.Random) -> tuple[str, str]:
    w = " ".join(r.sample(WORDS, 2))
    return f'Write "{w}" in upper case.', f'In upper case, "{w}" is "{w.upper()}".'


def t_count(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'


def _list(r: random.Random) -> list[int]:
    return [r.randint(0, 50) for _ in range(r.randint(3, 7))]


def t_sort(r: random.Random) -> tuple[str, str]:
    xs = _list(r)
    return f"Sort the list {xs} in ascending order.", f"The sorted list is {sorted(xs)}."


def t_stat(r: random.Random) -> tuple[str, str]:
    xs = _list(r)
    kind = r.choice(["largest", "smallest", "sum"])
    if kind == "sum":
        return f"What is the sum of {xs}?", f"The sum of {xs} is {sum(xs)}."
    value = max(xs) if kind == "largest" else min(xs)
    return f"What is the {kind} number in {xs}?", f"The {kind} number in {xs} is {value}."


CODE_TASKS = [
    ("returns the sum of two numbers", "a, b", "return a + b", lambda: (3, 4), lambda a, b: a + b),
    (
        "returns the product of two numbers",
        "a, b",
        "return a * b",
        lambda: (3, 4),
        lambda a, b: a * b,
    ),
    ("returns the larger of two numbers", "a, b", "return a if a > b else b", lambda: (3, 9), max),
    ("returns the square of a number", "x", "return x * x", lambda: (7,), lambda x: x * x),
    ("reverses a string", "s", "return s[::-1]", lambda: ("'abc'",), None),
    (
        "counts the even numbers in a list",
        "nums",
        "return sum(1 for n in nums if n % 2 == 0)",
        lambda: ("[1, 2, 4]",),
        None,
    ),
    (
        "returns the last element of a list",
        "items",
        "return items[-1]",
        lambda: ("[5, 6, 7]",),
        None,
    ),
    (
        "checks whether a number is even",
        "n",
        "return n % 2 == 0",
        lambda: (10,),
        lambda n: n % 2 == 0,
    ),
]
FUNC_NAMES = ["solve", "compute", "helper", "calc", "run_task", "answer", "func", "do_it"]


def t_code(r: random.Random) -> tuple[str, str]:
    i = r.randrange(len(CODE_TASKS))
    what, args, body, example, fn = CODE_TASKS[i]
    name = f"{r.choice(FUNC_NAMES)}_{i}"
    ex = example()
    call = f"{name}({', '.join(str(a) for a in ex)})"
    q = f"Write a Python function named `{name}` that {what}."
    a = f"```python\ndef {name}({args}):\n    {body}\n```\nThe function `{name}` {what}."
    if fn is not None:
        a += f" For example, `{call}` returns {fn(*ex)}."
    return q, a


TASKS = [t_arith, t_two_step, t_reverse, t_upper, t_count, t_sort, t_stat]


def qa(r: random.Random) -> tuple[str, str]:
    return r.choice(TASKS)(r)


def follow_up(r: random.Random, answer: str) -> tuple[str, str] | None:
    """A second turn that refers to the previous numeric answer, when there is one."""
    tail = answer.rstrip(".").split()[-1]
    if not tail.lstrip("-").isdigit():
        return None
    v, k = int(tail), r.randint(2, 5)
    return f"Now multiply the result by {k}.", f"{v} * {k} = {v * k}. The answer is {v * k}."


# ---------------------------------------------------------------------------------------------
# Datasets in their source layouts.


def megacode2(r: random.Random) -> list[dict]:
    rows = []
    for i in range(220):
        q, a = t_code(r) if i % 2 == 0 else qa(r)
        rows.append({"USER": q, "ASSISTANT": a})
    # Rows the reader drops: blank / missing field and a phrase of the word filter.
    rows[5]["ASSISTANT"] = "   "
    rows[17]["USER"] = None
    rows[29]["ASSISTANT"] = "As an AI language model, I cannot compute this."
    return rows


def orca_chat(r: random.Random) -> list[dict]:
    rows = []
    for i in range(130):
        turns = []
        q, a = qa(r)
        turns.append({"input": q, "output": a})
        if i % 3 == 0 and (f := follow_up(r, a)) is not None:
            turns.append({"input": f[0], "output": f[1]})
        system = r.choice(SYSTEMS) if i % 4 else ""
        # Even rows in orca-best's layout (the seed's, {"samples": [...]}, whose first pair
        # alone is read), odd rows as orca-chat-gpt4's plain list (read whole).
        conv = {"samples": turns} if i % 2 == 0 else turns
        rows.append({"id": f"orca-{i}", "instruction": system, "conversation": conv})
    return rows


def _dolly_row(r: random.Random, lang: str) -> dict:
    name, n, m = r.choice(NAMES), r.randint(2, 30), r.randint(2, 30)
    item = r.choice(ITEMS[lang])
    cite = r.choice(["[1]", "[2, 3]", "[citation needed]", "[a]", ""])
    templates = {
        "en": (
            f"{name} has {n} {item}{cite}. A friend gives {name} {m} more {item}.",
            f"How many {item} does {name} have now?",
            f"{name} has {n} + {m} = {n + m} {item} now.",
        ),
        "de": (
            f"{name} hat {n} {item}{cite}. Ein Freund gibt {name} {m} weitere {item}.",
            f"Wie viele {item} hat {name} jetzt?",
            f"{name} hat jetzt {n} + {m} = {n + m} {item}.",
        ),
        "es": (
            f"{name} tiene {n} {item}{cite}. Un amigo le da {m} {item} más.",
            f"¿Cuántos {item} tiene {name} ahora?",
            f"{name} tiene ahora {n} + {m} = {n + m} {item}.",
        ),
        "fr": (
            f"{name} a {n} {item}{cite}. Un ami donne {m} {item} de plus à {name}.",
            f"Combien de {item} {name} a-t-il maintenant ?",
            f"{name} a maintenant {n} + {m} = {n + m} {item}.",
        ),
        "it": (
            f"{name} ha {n} {item}{cite}. Un amico gli dà altre {m} {item}.",
            f"Quante {item} ha {name} adesso?",
            f"{name} ha adesso {n} + {m} = {n + m} {item}.",
        ),
    }
    context, instruction, response = templates[lang]
    if r.random() < 0.3:  # open questions without context
        instruction, response = qa(r)
        context = ""
    return {
        "instruction": instruction,
        "context": context,
        "response": response,
        "category": "open_qa" if not context else "closed_qa",
    }


def dolly(r: random.Random) -> dict[str, list[dict]]:
    counts = {"en": 90, "de": 40, "es": 30, "fr": 30, "it": 10}
    return {lang: [_dolly_row(r, lang) for _ in range(k)] for lang, k in counts.items()}


def oa_leet10k(r: random.Random) -> list[dict]:
    rows = []
    for i in range(90):
        q, a = t_code(r)
        xs = _list(r)
        q += f" Then explain how it works on the input {xs}."
        a += f" On the input {xs}, the list has {len(xs)} elements and its sum is {sum(xs)}."
        rows.append({"INSTRUCTION": q, "RESPONSE": a, "SOURCE": f"sample-leet-{i}"})
    rows[11]["RESPONSE"] = "I'm sorry, but as an AI language model I do not write code."
    return rows


def chat(r: random.Random) -> list[dict]:
    rows = []
    for i in range(110):
        messages = []
        if i % 2:
            messages.append({"role": "system", "content": r.choice(SYSTEMS)})
        q, a = qa(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0 and (f := follow_up(r, a)) is not None:
            messages += [{"role": "user", "content": f[0]}, {"role": "assistant", "content": f[1]}]
        rows.append({"messages": messages, "lang": "en"})
    return rows


def _message(r, counter, role, text, lang, rank=None, **extra) -> dict:
    counter[0] += 1
    m = {
        "message_id": f"m{counter[0]:05d}",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "synthetic": False,
        "rank": rank,
        "replies": [],
    }
    m.update(extra)
    return m


def oasst_trees(r: random.Random) -> list[dict]:
    """Trees: a prompt, two or three ranked assistant replies (rank 0 best), sometimes a prompter
    follow-up with its own reply. The rank-0 reply is the task's answer; lower-ranked replies
    are terse."""
    trees, counter = [], [0]
    for i in range(90):
        lang = "de" if i % 9 == 4 else ("ja" if i % 23 == 7 else "en")
        q, a = qa(r)
        root = _message(r, counter, "prompter", q, lang)
        n_replies = r.choice([1, 2, 3])
        for k in range(n_replies):
            text = a if k == 0 else a.split(". ")[-1]
            reply = _message(r, counter, "assistant", text, lang, rank=k if n_replies > 1 else None)
            if k == 0 and (f := follow_up(r, a)) is not None and i % 2 == 0:
                p2 = _message(r, counter, "prompter", f[0], lang)
                p2["replies"].append(_message(r, counter, "assistant", f[1], lang, rank=None))
                reply["replies"].append(p2)
            root["replies"].append(reply)
        if i % 11 == 3:
            root["replies"][0]["deleted"] = True
        if i % 13 == 5:
            root["replies"][-1]["synthetic"] = True
        state = "ready_for_export"
        if i % 17 == 9:
            state = "aborted_low_grade"
        if i % 19 == 2:
            root["review_result"] = False
        r.shuffle(root["replies"])  # ranks, not positions, say which reply is best
        trees.append({"message_tree_id": f"t{i:04d}", "tree_state": state, "prompt": root})
    return trees


# ---------------------------------------------------------------------------------------------
# Writers (byte-for-byte reproducible: gzip without a timestamp, sorted JSON keys are not needed
# as dict order is fixed).


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as f:
        f.write(data)
    return out.getvalue()


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {k: [row.get(k) for row in rows] for k in rows[0]}
    pq.write_table(pa.table(columns), path, compression="zstd")


def generate(seed: int = SEED) -> dict[str, object]:
    """All datasets, in memory: {kind: rows} (dolly: {lang: rows})."""
    r = random.Random(seed)
    return {
        "megacode2": megacode2(r),
        "orca-chat": orca_chat(r),
        "dolly15k_multilingual": dolly(r),
        "oa_leet10k": oa_leet10k(r),
        "chat": chat(r),
        "oasst_export": oasst_trees(r),
    }


def write_samples(out: Path, data: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[Path, bytes | list] = {
        out / "megacode2" / "train-00000-of-00001.parquet": data["megacode2"],
        out / "orca-chat" / "orca_best.json": json.dumps(
            data["orca-chat"], ensure_ascii=False, indent=1
        ).encode(),
        out / "oa_leet10k" / "oa_leet10k.jsonl.gz": _gzip_bytes(_jsonl_bytes(data["oa_leet10k"])),
        out / "chat" / "chat.jsonl": _jsonl_bytes(data["chat"]),
        out / "oasst_export" / "2023-07-23_sample_oasst_ready.trees.jsonl.gz": _gzip_bytes(
            _jsonl_bytes(data["oasst_export"])
        ),
    }
    dolly_dir = out / "dolly15k_multilingual"
    by_lang = data["dolly15k_multilingual"]
    files[dolly_dir / "en.jsonl"] = _jsonl_bytes(by_lang["en"])
    files[dolly_dir / "de-00000-of-00001.parquet"] = by_lang["de"]
    files[dolly_dir / "es.jsonl.gz"] = _gzip_bytes(_jsonl_bytes(by_lang["es"]))
    files[dolly_dir / "fr.json"] = json.dumps(by_lang["fr"], ensure_ascii=False, indent=1).encode()
    files[dolly_dir / "it.jsonl"] = _jsonl_bytes(by_lang["it"])
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            _parquet(path, content)
    return sorted(files)


def tokenizer_lines(data: dict) -> list[str]:
    """Training text for the sample tokenizer: each turn as `{role}\n{text}`, the way ChatML
    renders it between the special tokens (so role headers and newlines get their own pieces)."""
    turns: list[tuple[str, str | None]] = []
    for row in data["megacode2"]:
        turns += [("user", row["USER"]), ("assistant", row["ASSISTANT"])]
    for row in data["orca-chat"]:
        turns.append(("system", row["instruction"]))
        conv = row["conversation"]
        for t in conv["samples"] if isinstance(conv, dict) else conv:
            turns += [("user", t["input"]), ("assistant", t["output"])]
    for rows in data["dolly15k_multilingual"].values():
        for row in rows:
            turns += [
                ("user", row["instruction"]),
                ("context", row["context"]),
                ("assistant", row["response"]),
            ]
    for row in data["oa_leet10k"]:
        turns += [("user", row["INSTRUCTION"]), ("assistant", row["RESPONSE"])]
    for row in data["chat"]:
        turns += [(m["role"], m["content"]) for m in row["messages"]]

    def walk(node: dict) -> None:
        turns.append(("user" if node["role"] == "prompter" else "assistant", node["text"]))
        for child in node["replies"]:
            walk(child)

    for tree in data["oasst_export"]:
        walk(tree["prompt"])
    return [f"{role}\n{text}" for role, text in turns if text and text.strip()]


SAMPLE_VOCAB_SIZE = 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE, help="sample data directory")
    parser.add_argument(
        "--tokenizer", type=Path, default=HERE.parent / "assets" / "sample_sp.model"
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="write the data only")
    args = parser.parse_args()
    data = generate()
    for path in write_samples(args.out, data):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    if not args.no_tokenizer:
        import hashlib

        import sentencepiece

        from data.tokenizer import train_sentencepiece

        model = train_sentencepiece(tokenizer_lines(data), args.tokenizer, SAMPLE_VOCAB_SIZE)
        info = {
            "sentencepiece": sentencepiece.__version__,  # the trainer that made these exact bytes
            "sha256": hashlib.sha256(model).hexdigest(),
            "vocab_size": SAMPLE_VOCAB_SIZE,
            "made_by": "python -m data.samples.generate",
        }
        args.tokenizer.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.tokenizer} ({len(model)} bytes, vocab {SAMPLE_VOCAB_SIZE})")


if __name__ == "__main__":
    main()
