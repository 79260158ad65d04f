"""`distill-pipe inspect STORE [--verify]`: a human-readable report of a logit store."""

from __future__ import annotations

import os

from distill_pipe.store.format import DONE_ARRAY, HEAD_GROUP, INPUT_IDS_ARRAY, REPAIR_HINT, format_ranges
from distill_pipe.store.reader import LogitStore, is_url
from distill_pipe.store.writer import RESERVED_ATTRS


def bytes_under(store: LogitStore, sub: str = "") -> int:
    """Bytes stored under `sub` (a key prefix such as 'train/hidden'): a local walk or fsspec du."""
    if is_url(store.location):
        import fsspec

        fs, root = fsspec.core.url_to_fs(store.location)
        path = f"{root.rstrip('/')}/{sub}" if sub else root
        return int(fs.du(path)) if fs.exists(path) else 0
    top = os.path.join(store.location, sub)
    if os.path.isfile(top):
        return os.path.getsize(top)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _fmt_value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items() if x is not None)
    return str(v)


def describe(store: LogitStore, verify: bool = False, failures: list | None = None) -> str:
    """A human-readable report; with verify, every shard is decoded (or pass `failures` from store.verify())."""
    info = store.info
    v = info.get("versions", {})
    lines = [f"store       {store.location}",
             f"format      {info['format']} v{info['format_version']}, created {info.get('created')} by "
             + ", ".join(f"{k} {x}" for k, x in v.items() if x)]
    for key, value in info.items():
        if key not in RESERVED_ATTRS:
            lines.append(f"{key:<11} {_fmt_value(value)}")
    lines.append(f"codec       {store.codec}")
    lines.append(f"shapes      seq_len {store.seq_len}, vocab {store.vocab_size:,}, hidden "
                 f"{store.hidden_size}, {store.shard_size} sequences per shard")
    raw_bf16 = 2 * store.vocab_size
    total_payload = total_tokens = 0
    for split in store.splits:
        done = store.completed_shards(split)
        k = store.num_shards(split)
        n = store.num_sequences(split)
        tokens = sum(b - a for a, b in (store.shard_range(split, s) for s in done)) * store.seq_len
        payload = sum(bytes_under(store, f"{split}/{name}") for name in store.payload_names)
        if tokens:  # an unwritten split only holds array metadata
            total_payload += payload
            total_tokens += tokens
        line = (f"{split:<11} {n:,} sequences, {n * store.seq_len:,} tokens, shards complete {len(done)}/{k}")
        if len(done) < k:
            line += f" (missing {format_ranges(set(range(k)) - done)})"
        if tokens:
            line += f"; payload {_fmt_bytes(payload)} = {payload / tokens:,.0f} B/token"
        lines.append(line)
    head = bytes_under(store, HEAD_GROUP) if store.codec.name == "factored" else 0
    ids = sum(bytes_under(store, f"{s}/{INPUT_IDS_ARRAY}") + bytes_under(store, f"{s}/{DONE_ARRAY}")
              for s in store.splits)
    lines.append(f"on disk     {_fmt_bytes(bytes_under(store))} (payload {_fmt_bytes(total_payload)}, head "
                 f"{_fmt_bytes(head)}, input_ids+done {_fmt_bytes(ids)})")
    if total_tokens:
        bpt = total_payload / total_tokens
        lines.append(f"bytes/token {bpt:,.1f} (payload only; head stored once) = {raw_bf16 / bpt:,.1f}x "
                     f"smaller than raw bf16 logits ({raw_bf16:,} B/token)")
    if verify or failures is not None:
        failures = store.verify() if failures is None else failures
        if failures:
            lines.append(f"verify      FAILED: {len(failures)} shard(s); {REPAIR_HINT}")
            lines += [f"  {s} shard {k}: {err}" for s, k, err in failures]
        else:
            lines.append("verify      ok: every shard read, decompressed and checked")
    return "\n".join(lines)
