"""SentencePiece tokenizer with Megatron-LLM's id layout.

Ids: the base SentencePiece vocabulary (n pieces), then `<CLS> <SEP> <EOD> <MASK>`, then the pad,
bos and eos pieces when the model has none of its own (Llama has bos `<s>` = 1 and eos `</s>` = 2
but no pad, so only `<PAD>` is added), then each extra id (`<|im_start|>`, `<|im_end|>`). With
Llama-2's 32000-piece model that is `<|im_start|>` = 32005, `<|im_end|>` = 32006, vocab 32007: the
ids of the released checkpoint.

Encoding splits every special token out of the text first (so a literal `<|im_end|>` or `</s>` in
the text becomes that one id, as in Megatron-LLM) and hands the pieces between them to
SentencePiece, one call per piece; no BOS is added. `decode` is the exact inverse of `encode` for
any text (specials are written back verbatim, no spaces inserted) but one holding U+2581 "▁",
which SentencePiece reads as the space it stands for ("a▁b" comes back as "a b").
"""

import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

DEFAULT_TOKENIZER_PATH = str(Path(__file__).resolve().parent / "assets" / "sample_sp.model")
DEFAULT_EXTRA_IDS = ("<|im_start|>", "<|im_end|>")
IM_START, IM_END = DEFAULT_EXTRA_IDS

# Added after the base vocabulary, in this order, unless the model already has the piece.
_MEGATRON_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")


def parse_extra_ids(value: str | Sequence[str] | None) -> list[str]:
    """`--vocab_extra_ids_list` value -> token list.

    Accepts the seed's shell-quoted form `"\\"<|im_start|>,<|im_end|>\\""` (as the shell passes
    it, or verbatim with its backslashes), a plain comma-separated string, or a sequence of
    strings. None or "" -> [].
    """
    if value is None:
        return []
    if isinstance(value, str):
        # Verbatim from an arguments file the shell never saw: `"\"a,b\""` -> `""a,b""`.
        text = value.strip().replace('\\"', '"').replace("\\'", "'")
        # The seed quotes the list twice for the shell; whatever quotes survive belong to no token.
        while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1].strip()
        items = text.split(",") if text else []
    else:
        items = list(value)
    tokens = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"vocab_extra_ids_list: expected strings, found {item!r}")
        token = item.strip().strip("\"'").strip()
        if not token:
            continue
        if token in tokens:
            raise ValueError(f"vocab_extra_ids_list: {token!r} is listed twice in {value!r}")
        tokens.append(token)
    return tokens


class Tokenizer:
    """SentencePiece model + Megatron-LLM special ids + extra ids (ChatML by default)."""

    def __init__(
        self,
        model_path: str,
        vocab_extra_ids_list: Sequence[str] | str | None = DEFAULT_EXTRA_IDS,
    ):
        self.model_path = str(model_path)
        path = Path(self.model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {self.model_path} does not exist: pass the path of a "
                "SentencePiece `tokenizer.model` (e.g. Llama-2's)"
            )
        model_bytes = path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"{self.model_path} is not a SentencePiece model: {e}") from None
        self.extra_ids: list[str] = parse_extra_ids(vocab_extra_ids_list)
        self.fingerprint = _fingerprint(model_bytes, self.extra_ids)
        self.base_vocab_size = self._sp.GetPieceSize()

        # Megatron-LLM's layout: a special that is already a piece keeps that piece's id.
        pieces = {self._sp.IdToPiece(i): i for i in range(self.base_vocab_size)}
        self.special_tokens: dict[str, int] = {}
        next_id = self.base_vocab_size

        def add(token: str) -> int:
            nonlocal next_id
            if token not in pieces:
                pieces[token] = next_id
                next_id += 1
            self.special_tokens[token] = pieces[token]
            return pieces[token]

        self.cls_id, self.sep_id, self.eod_id, self.mask_id = (add(t) for t in _MEGATRON_SPECIALS)
        self.pad_id = add(self._own_piece(self._sp.pad_id(), "<PAD>"))
        self.bos_id = add(self._own_piece(self._sp.bos_id(), "<BOS>"))
        self.eos_id = add(self._own_piece(self._sp.eos_id(), "<EOS>"))
        for token in self.extra_ids:
            add(token)
        self.vocab_size = next_id
        self.unk_id = self._sp.unk_id()
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        # Longest first, so a special that is a prefix of another never cuts it short.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self._first_chars = {t[0] for t in alternatives}
        self._first_char = next(iter(self._first_chars))
        # encode_turns' shortcut finds specials in a content by their one common first character.
        self._turn_fast_path = (
            IM_START in self.special_tokens
            and IM_END in self.special_tokens
            and len(self._first_chars) == 1
            and not any("<" in t[1:] or ">" in t[:-1] for t in alternatives)
        )
        if self._turn_fast_path:  # the fixed ids around every ChatML turn's content
            self._turn_head = [self.special_tokens[IM_START]]
            self._turn_tail = [self.special_tokens[IM_END]] + self.encode("\n")
        self._encode_int32 = _int32_encoder(self._sp)
        self._numpy_out = self._encode_int32 is not None

    def _own_piece(self, piece_id: int, fallback: str) -> str:
        if 0 <= piece_id < self.base_vocab_size:
            return self._sp.IdToPiece(piece_id)
        return fallback

    @property
    def im_start_id(self) -> int:
        return self._extra_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._extra_id(IM_END)

    def _extra_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(
                f"{token} is not a token of this tokenizer: extra ids are {self.extra_ids}; "
                "ChatML needs vocab_extra_ids_list to contain <|im_start|>,<|im_end|>"
            )
        return self.special_tokens[token]

    def token_id(self, token: str) -> int:
        """Id of a special token or of a base piece."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        i = self._sp.PieceToId(token)
        if i == self.unk_id and token != self._sp.IdToPiece(self.unk_id):
            raise KeyError(f"{token!r} is not a piece of {self.model_path}")
        return i

    def piece(self, token_id: int) -> str:
        """The piece (or special token) of one id."""
        token_id = int(token_id)
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        if 0 <= token_id < self.base_vocab_size:
            return self._sp.IdToPiece(token_id)
        raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    def _segments(self, text: str) -> list[str]:
        """[text, special, text, special, ..., text]: specials at odd positions."""
        if len(self._first_chars) == 1:  # the usual case: every special starts with "<"
            if self._first_char not in text:
                return [text]
        elif not any(c in text for c in self._first_chars):
            return [text]
        return self._split.split(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: specials split out first, no BOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts with one SentencePiece call (the per-call overhead dominates
        short pieces such as the `\\n` after every `<|im_end|>`)."""
        segmented = [self._segments(t) for t in texts]
        plain = [seg for segs in segmented for seg in segs[::2]]
        encoded = self._sp.Encode(plain, out_type=int, num_threads=1) if plain else []
        out = []
        k = 0
        special = self.special_tokens
        for segs in segmented:
            ids = list(encoded[k])
            k += 1
            for j in range(1, len(segs), 2):
                ids.append(special[segs[j]])
                ids.extend(encoded[k])
                k += 1
            out.append(ids)
        return out

    def encode_flat(self, texts: Sequence[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back and each text's length: the pretokenizer's hot path
        (one SentencePiece call, one flat list, no per-text lists)."""
        segmented = [self._segments(t) for t in texts]
        plain = [seg for segs in segmented for seg in segs[::2]]
        encoded = self._sp.Encode(plain, out_type=int, num_threads=1) if plain else []
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        special = self.special_tokens
        k = 0
        for n, segs in enumerate(segmented):
            start = len(flat)
            flat += encoded[k]
            k += 1
            for j in range(1, len(segs), 2):
                flat.append(special[segs[j]])
                flat += encoded[k]
                k += 1
            lengths[n] = len(flat) - start
        return np.array(flat, dtype=dtype), lengths

    def encode_turns(
        self, contents: Sequence[str], dtype=np.int32
    ) -> tuple[np.ndarray, np.ndarray]:
        """`encode_flat` of the ChatML turns `<|im_start|>{content}<|im_end|>\\n` (content =
        `{role}\\n{text}`) without building and re-splitting the turn strings.

        The scaffold's ids are fixed (`<|im_start|>`; `<|im_end|>` and the ids of "\\n"), so
        only the contents go through SentencePiece. Equal to `encode_flat` of the whole strings
        because no special token holds a `<` after its first character: none can start in the
        content and end in the scaffold or the other way round (checked at construction; other
        extra ids take the general path, as do extra ids that do not start with `<`: the
        shortcut looks for one first character).
        """
        if not self._turn_fast_path:
            return self.encode_flat([f"{IM_START}{c}{IM_END}\n" for c in contents], dtype)
        head, tail = self._turn_head, self._turn_tail
        lt, split, special = self._first_char, self._split.split, self.special_tokens
        # Most contents hold no special token: one segment each, no regex.
        plain: list[str] = []
        inner: list[list[int] | None] = []  # per content: ids of the specials inside, or None
        for c in contents:
            if lt not in c:
                plain.append(c)
                inner.append(None)
            else:
                segs = split(c)
                plain += segs[::2]
                inner.append([special[t] for t in segs[1::2]])
        if self._numpy_out:
            return self._assemble_turns(plain, inner, dtype)
        encoded = self._sp.Encode(plain, out_type=int, num_threads=1) if plain else []
        parts: list[list[int]] = []
        lengths = np.empty(len(contents), dtype=np.int64)
        fixed = len(head) + len(tail)
        k = 0
        for n, specials in enumerate(inner):
            ids = encoded[k]
            k += 1
            parts += (head, ids)
            size = fixed + len(ids)
            if specials is not None:
                for sid in specials:
                    ids = encoded[k]
                    k += 1
                    parts += ([sid], ids)
                    size += 1 + len(ids)
            parts.append(tail)
            lengths[n] = size
        flat = np.fromiter(chain.from_iterable(parts), dtype=dtype, count=int(lengths.sum()))
        return flat, lengths

    def _assemble_turns(
        self, plain: list[str], inner: list[list[int] | None], dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """`encode_turns`' ids from SentencePiece's int32 buffers, placed with numpy: no Python
        int per token, no per-token list.

        Every segment of text is preceded by exactly one id (`<|im_start|>` before a content's
        first segment, else the special token that split it) and a content's last segment is
        followed by the tail (`<|im_end|>` and the ids of "\\n")."""
        tail = np.asarray(self._turn_tail, dtype=np.int64)
        n = len(inner)
        if not plain:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
        ids, seg_len = self._encode_int32(plain)
        if len(plain) == n:  # no content held a special token: one segment each
            prefix = np.full(n, self._turn_head[0], dtype=np.int64)
            last = np.ones(n, dtype=bool)
            first_seg = np.arange(n, dtype=np.int64)
        else:
            head = self._turn_head[0]
            prefix_list: list[int] = []
            last_list: list[bool] = []
            first_list: list[int] = []
            for specials in inner:
                first_list.append(len(prefix_list))
                if specials is None:
                    prefix_list.append(head)
                    last_list.append(True)
                else:
                    prefix_list.append(head)
                    prefix_list += specials
                    last_list += [False] * len(specials)
                    last_list.append(True)
            prefix = np.array(prefix_list, dtype=np.int64)
            last = np.array(last_list, dtype=bool)
            first_seg = np.array(first_list, dtype=np.int64)
        per_seg = 1 + seg_len + tail.size * last
        ends = np.cumsum(per_seg)
        total = int(ends[-1])
        offsets = ends - per_seg
        out = np.empty(total, dtype=dtype)
        is_text = np.ones(total, dtype=bool)
        out[offsets] = prefix
        is_text[offsets] = False
        tail_pos = (offsets[last] + 1 + seg_len[last])[:, None] + np.arange(tail.size)
        out[tail_pos] = tail
        is_text[tail_pos] = False
        out[is_text] = ids
        lengths = np.add.reduceat(per_seg, first_seg)
        return out, lengths.astype(np.int64, copy=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Exact inverse of `encode`: base ids through SentencePiece, specials verbatim."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                if run:
                    parts.append(self._sp.Decode(run))
                    run = []
                parts.append(self._id_to_special[i])
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if run:
            parts.append(self._sp.Decode(run))
        return "".join(parts)

    def describe(self) -> dict:
        """What later stages check data against (written beside every output)."""
        return {
            "model_path": self.model_path,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "base_vocab_size": self.base_vocab_size,
            "extra_ids": list(self.extra_ids),
            "special_tokens": dict(self.special_tokens),
            "pad_id": self.pad_id,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
        }

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "extra_ids": self.extra_ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"], state["extra_ids"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"extra_ids={self.extra_ids})"
        )


def _int32_encoder(sp):
    """A function `texts -> (all ids back to back as int32, ids per text)` that takes the ids
    as SentencePiece's int32 buffers (no Python int per token), or None where this sentencepiece
    has no such output (`out_type="numpy"` came with 0.2.1).

    The buffers are taken straight from the extension's batch call when it is there and answers
    as `Encode` does (checked here, on texts with and without ids), else through the public
    `out_type="numpy"`, which wraps each buffer in its own array first.
    """
    probe = ["user\nHello, world! 123", "", "assistant\n\u00e9t\u00e9 <x> \u2603"]
    try:
        ref = sp.Encode(probe, out_type=int, num_threads=1)
        arrays = sp.Encode(probe, out_type="numpy", num_threads=1)
        if [a.tolist() for a in arrays] != ref:
            return None
    except (ValueError, TypeError, RuntimeError, AttributeError):
        return None

    def public(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        arrays = sp.Encode(texts, out_type="numpy", num_threads=1)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        return np.concatenate(arrays), lengths

    batch = getattr(getattr(sp, "_processor", None), "_EncodeAsBufferBatch", None)
    if batch is None:
        return public

    def direct(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # (texts, num_threads, thread_pool, enable_sampling, nbest_size, alpha, add_bos,
        # add_eos, reverse): what Encode passes for out_type="numpy" without sampling.
        bufs = batch(texts, 1, None, False, -1, 0.1, False, False, False)
        lengths = np.fromiter(map(len, map(memoryview, bufs)), dtype=np.int64, count=len(bufs))
        return np.frombuffer(b"".join(bufs), dtype=np.int32), lengths

    try:
        ids, lengths = direct(probe)
        ok = lengths.tolist() == [len(r) for r in ref] and ids.tolist() == sum(ref, [])
    except Exception:  # an extension whose private call differs: use the public one
        ok = False
    return direct if ok else public


def _fingerprint(model_bytes: bytes, extra_ids: Sequence[str]) -> str:
    h = hashlib.sha256(model_bytes)
    h.update(b"\0extra_ids\0")
    h.update(json.dumps(list(extra_ids)).encode())
    return h.hexdigest()


def train_sentencepiece(lines: Iterable[str], out_path: str | Path, vocab_size: int) -> bytes:
    """Train a small Llama-like BPE model, deterministically, and write it to `out_path`.

    Llama-2's normalizer settings (no whitespace folding, digits split, byte fallback, unk 0 /
    bos 1 / eos 2, no pad), one thread and no input sampling or shuffling, so the same lines and
    the same sentencepiece version give the same bytes.
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(lines)),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    data = buffer.getvalue()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out_path)
    return data
