"""Conversations -> token ids and a per-token target mask, rendered with the teacher's chat template.

A record is a conversation: a `messages` list of {role, content} (the Hugging Face chat format), or a
prompt/completion pair (each a string, or a list of messages as TRL's conversational format has it; a
string prompt becomes one user message and a string completion one assistant message).

Rendering. The whole conversation is rendered once with the chat template (the tokenizer's, or
`data.chat_template`). Each assistant turn's span in that text is found by rendering prefixes: the text
of the messages before it with the generation prompt, and of the messages through it. The target is the
rendered turn between the two, through its end-of-turn marker (`<|im_end|>` for ChatML and SmolLM2,
`<|eot_id|>` for Llama 3): the student must learn to stop. Whitespace the template writes after that
marker (ChatML's newline) is not a target: generation stops at the marker, so no model ever produces it.
Templates whose prefixes are not prefixes of the whole text (some drop earlier reasoning, for example)
are refused with the record named.

Tokens. The text is tokenized piece by piece, prompt and target pieces apart, so a target starts on a
token boundary exactly where generation would start after the prompt; decoding a conversation's target
tokens gives back exactly its assistant turns, markers included (tested). `targets: all` marks every
token but the first of each conversation instead.

Packing (`pack`). Whole conversations go into rows of `seq_len` tokens, several per row, best fit over
a window of 32 open rows (the row with the least room that still holds the conversation; the fullest row
is closed when the window is full); a row's tail is padding (the pad token, or EOS) with mask 0. A
conversation longer than a row keeps its first `seq_len` tokens (counted in the stats). Attention stays
causal over the whole row: conversations are not isolated from each other, as documents are not in the
text path (joined by EOS there): a conversation attends to the ones before it in its row, and every
target still sees its whole prompt. Padding sits after every real token of its row, so it changes no
real position's logits.

Shapes: N rows, L seq_len. `target_mask[n, t] == 1` iff token t of row n is a target: the prediction of
token t from position t-1 counts exactly then (so target_mask[:, 0] is always 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from distill_pipe.config import CHAT_TARGETS as TARGETS


class ChatError(ValueError):
    """A conversation or template that cannot be rendered; the message names the record and the fix."""


def _message_list(value, where: str, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ChatError(f"{where}: {what} must be a non-empty list of {{role, content}} messages, got "
                        f"{type(value).__name__}; check data.format and the field names")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatError(f"{where}: {what}[{j}] is not a {{role, content}} message ({str(m)[:60]!r}); "
                            "fix the record or set data.messages_field")
        content = m["content"]
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"{where}: {what}[{j}] has non-text content ({type(content).__name__}); only text "
                            "messages are supported: drop or flatten such records")
        out.append({"role": m["role"], "content": content})
    return out


def conversation(record, fmt: str, *, messages_field: str = "messages", prompt_field: str = "prompt",
                 completion_field: str = "completion", where: str = "record") -> list[dict]:
    """A record (mapping) -> the list of {role, content} messages to render."""
    if not isinstance(record, dict):
        raise ChatError(f"{where} is a {type(record).__name__}, not a record with fields; check data.format")
    if fmt == "chat":
        if messages_field not in record:
            raise ChatError(f"{where} has no field {messages_field!r} (has: {', '.join(map(str, record))}); "
                            "set data.messages_field")
        return _message_list(record[messages_field], where, messages_field)
    if fmt == "prompt_completion":
        for key, name in ((prompt_field, "prompt_field"), (completion_field, "completion_field")):
            if key not in record:
                raise ChatError(f"{where} has no field {key!r} (has: {', '.join(map(str, record))}); "
                                f"set data.{name}")
        prompt, completion = record[prompt_field], record[completion_field]
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _message_list(prompt, where,
                                                                                               prompt_field)
        if isinstance(completion, str):
            c = [{"role": "assistant", "content": completion}]
        else:
            c = _message_list(completion, where, completion_field)
        return p + c
    raise ChatError(f"data.format={fmt!r} is not a conversation format; use chat or prompt_completion")


# ---------------------------------------------------------------- rendering


def resolve_template(tok, template: str | None, teacher: str) -> str:
    """The Jinja chat template to use: `template` (data.chat_template) or the tokenizer's own."""
    if template:
        return template
    own = getattr(tok, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ChatError(f"the tokenizer of {teacher} has no chat template; set data.chat_template to a Jinja "
                        "chat template (docs/chat.md has a ChatML one) or use data.format=text")
    return own


def _render(tok, messages: list[dict], template: str, generation_prompt: bool, where: str) -> str:
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 errors, raise_exception() in a template, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChatError(f"{where}: the chat template fails on this conversation ({msg}); fix the record "
                        "(roles, their order) or set data.chat_template") from None
    if not isinstance(text, str):
        raise ChatError(f"{where}: the chat template rendered {type(text).__name__}, not text")
    return text


def segments(messages: list[dict], tok, template: str, targets: str = "assistant",
             where: str = "record") -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_target) pieces; their concatenation is the render.

    targets: "assistant" (each assistant turn through its end-of-turn marker) or "all" (one piece).
    """
    if targets not in TARGETS:
        raise ChatError(f"data.targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    full = _render(tok, messages, template, False, where)
    if targets == "all":
        return [(full, True)]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], template, True, where)
        through = _render(tok, messages[: i + 1], template, False, where)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)
                and len(before) >= cursor):
            raise ChatError(f"{where}: the chat template does not render this conversation turn by turn (the "
                            f"text before assistant message {i} is not a prefix of the whole conversation), so "
                            "its assistant tokens cannot be found; set data.chat_template to a template that "
                            "renders each turn on its own (e.g. ChatML), or use data.targets=all")
        end = len(through.rstrip())  # whitespace after the end-of-turn marker belongs to the next prompt
        if end > len(before):
            spans.append((len(before), end))
            cursor = end
    out: list[tuple[str, bool]] = []
    cursor = 0
    for a, b in spans:
        if a > cursor:
            out.append((full[cursor:a], False))
        out.append((full[a:b], True))
        cursor = b
    if cursor < len(full):
        out.append((full[cursor:], False))
    return out


@dataclass
class Tokenized:
    """One conversation: token ids and its target mask, both (T,)."""

    input_ids: np.ndarray  # (T,) int64
    target_mask: np.ndarray  # (T,) uint8


def join_pieces(ids_per_piece: list, is_target: list[bool]) -> Tokenized:
    """One conversation from its pieces' token ids: concatenated, the mask 1 on target pieces' tokens.

    The conversation's first token is never a target (nothing before it in the conversation predicts it);
    this matters for targets "all" (one piece, a target)."""
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids_per_piece]) if ids_per_piece else \
        np.zeros(0, np.int64)
    mask = np.repeat(np.asarray(is_target, dtype=np.uint8), [len(x) for x in ids_per_piece])
    if len(mask):
        mask[0] = 0
    return Tokenized(ids, mask)


def tokenize_segments(pieces_per_conv: list[list[tuple[str, bool]]], tok) -> list[Tokenized]:
    """Tokenize each piece on its own (one batched tokenizer call) and join them per conversation."""
    flat = [text for pieces in pieces_per_conv for text, _ in pieces]
    ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for pieces in pieces_per_conv:
        out.append(join_pieces(ids[k:k + len(pieces)], [t for _, t in pieces]))
        k += len(pieces)
    return out


def render_conversations(messages_list: list[list[dict]], tok, template: str, targets: str = "assistant",
                         names: list[str] | None = None) -> list[Tokenized]:
    """Render and tokenize conversations (see the module docstring)."""
    names = names or [f"conversation {i}" for i in range(len(messages_list))]
    return tokenize_segments([segments(m, tok, template, targets, n) for m, n in zip(messages_list, names)], tok)


# ---------------------------------------------------------------- packing


@dataclass
class PackStats:
    conversations: int = 0
    truncated: int = 0
    """Conversations longer than a row, cut to its length."""
    dropped_target_tokens: int = 0
    """Target tokens lost to truncation or to the token cap."""
    skipped_no_target: int = 0
    """Conversations without a target token (no assistant turn), not packed."""
    real_tokens: int = 0
    """Real (non-padding) tokens in the packed rows."""
    target_tokens: int = 0
    padding_tokens: int = 0
    rows: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Packer:
    """Best-fit packing of whole conversations into (seq_len,) rows over a window of open rows.

    Each conversation goes into the open row with the least room that still holds it, or a new row; when
    more than `open_rows` rows are open the fullest is closed. Deterministic; order changes only within
    the window (the split's conversation order is already a seeded shuffle).
    """

    seq_len: int
    pad_id: int
    max_rows: int | None = None
    open_rows: int = 32
    stats: PackStats = field(default_factory=PackStats)
    _rows: list = field(default_factory=list)  # open rows: [used, [ids...], [mask...]]

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.stats.rows >= self.max_rows

    def add(self, conv: Tokenized) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Add one conversation; yields the rows (ids (L,) int32, mask (L,) uint8) this closes."""
        ids, mask = conv.input_ids, conv.target_mask
        if not mask.any():
            self.stats.skipped_no_target += 1
            return
        if len(ids) > self.seq_len:
            self.stats.truncated += 1
            self.stats.dropped_target_tokens += int(mask[self.seq_len:].sum())
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
        fits = [r for r in self._rows if r[0] + len(ids) <= self.seq_len]
        if fits:
            row = max(fits, key=lambda r: r[0])  # the least room that still holds it (first such on ties)
        else:
            if len(self._rows) >= self.open_rows:
                yield from self._close(max(self._rows, key=lambda r: r[0]))
            if self.full:
                self.stats.dropped_target_tokens += int(mask.sum())
                return
            row = [0, [], []]
            self._rows.append(row)
        row[0] += len(ids)
        row[1].append(ids)
        row[2].append(mask)
        self.stats.conversations += 1

    def _close(self, row) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._rows.remove(row)
        if self.full:  # over the cap: its conversations are dropped
            self.stats.conversations -= len(row[1])
            self.stats.dropped_target_tokens += int(sum(m.sum() for m in row[2]))
            return
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        mask = np.zeros(self.seq_len, dtype=np.uint8)
        ids[: row[0]] = np.concatenate(row[1])
        mask[: row[0]] = np.concatenate(row[2])
        self.stats.rows += 1
        self.stats.real_tokens += row[0]
        self.stats.target_tokens += int(mask.sum())
        self.stats.padding_tokens += self.seq_len - row[0]
        yield ids, mask

    def finish(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Close the rows still open, in the order they were opened."""
        for row in list(self._rows):
            yield from self._close(row)


def pack(convs: Iterable[Tokenized], seq_len: int, pad_id: int,
         max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, PackStats]:
    """(N, L) int32 ids, (N, L) uint8 target mask, stats. max_tokens caps the rows at max_tokens // L."""
    packer = Packer(seq_len, pad_id, None if max_tokens is None else max_tokens // seq_len)
    rows = [r for c in convs for r in packer.add(c)]
    rows += list(packer.finish())
    ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, seq_len), np.int32)
    mask = np.stack([r[1] for r in rows]) if rows else np.zeros((0, seq_len), np.uint8)
    return ids, mask, packer.stats


# ---------------------------------------------------------------- the embedded corpus


def pydoc_conversations() -> list[dict]:
    """`builtin:pydoc-chat`: one two-turn conversation per CPython pydoc topic (79), written from the
    documentation text that ships with every Python (`pydoc_data.topics`): the user asks about the topic,
    the assistant answers with its first paragraphs; the user asks for more, the assistant gives the next
    ones. Every third conversation has its own system message. An answer holds whole paragraphs up to 400
    characters (a longer first paragraph is cut at a sentence end), so a conversation fits 256 tokens."""
    from pydoc_data.topics import topics

    asks = ("What is {t} in Python?", "Explain {t} in Python.", "Tell me about {t}.",
            "What does the Python reference say about {t}?")
    more = ("Go on.", "Can you say more?", "What else should I know?")
    out = []
    for i, key in enumerate(sorted(topics)):
        lines = topics[key].strip().splitlines()
        title = lines[0].strip().strip('"')
        paragraphs = [p for p in (_flow(p) for p in "\n".join(lines[2:]).split("\n\n")) if len(p) > 40]
        if len(paragraphs) < 2:
            continue
        msgs = []
        if i % 3 == 2:
            msgs.append({"role": "system", "content": "You are a concise Python tutor."})
        first, rest = _answer(paragraphs, 0)
        second, _ = _answer(paragraphs, rest)
        if not second:
            continue
        msgs += [{"role": "user", "content": asks[i % len(asks)].format(t=title[0].lower() + title[1:])},
                 {"role": "assistant", "content": first},
                 {"role": "user", "content": more[i % len(more)]},
                 {"role": "assistant", "content": second}]
        out.append({"messages": msgs, "topic": key})
    return out


def _flow(paragraph: str) -> str:
    """Join a paragraph's wrapped lines; keep indented (code, grammar) paragraphs as they are."""
    p = paragraph.strip("\n")
    if p.startswith(" "):
        return p.strip()
    return " ".join(line.strip() for line in p.splitlines()).strip()


def _answer(paragraphs: list[str], start: int, limit: int = 400) -> tuple[str, int]:
    """Paragraphs from `start` joined while they fit `limit` characters (the first one cut to fit);
    returns the answer and the index of the next paragraph."""
    if start >= len(paragraphs):
        return "", start
    parts, i = [_cut(paragraphs[start], limit)], start + 1
    while i < len(paragraphs) and sum(len(p) + 2 for p in parts) + len(paragraphs[i]) <= limit:
        parts.append(paragraphs[i])
        i += 1
    return "\n\n".join(parts), i


def _cut(text: str, limit: int = 400) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > limit // 3 else text[:limit].rstrip() + "..."
