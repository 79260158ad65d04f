"""Store bytes of a conversation corpus: full payload vs payload zeroed where nothing is trained on vs ragged.

    python benchmarks/chat_store.py                            # 8 rows x 512 of builtin:pydoc-chat (~3 min, 2 cores)
    python benchmarks/chat_store.py --rows 4 --codecs factored

Teacher: builtin:smollm2-135m in fp32, its own chat template. Corpus: builtin:pydoc-chat (conversations written
from CPython's pydoc topics), rendered and packed exactly as `prepare` does (distill_pipe.chat), first --rows
rows. For each codec the teacher's payload of those rows goes through a real zarr store three ways:
  full     a store without a target mask: every position's payload (what a text store holds)
  zeroed   the store `teacher-logits` writes for conversations (format v2): payload set to a constant (0;
           dense-u8: 255) at every position whose next token is not a target (prompt, padding, a row's last
           position), left to compression
  ragged   only the kept positions, packed densely into whole rows (what a ragged layout would hold; its
           offsets, a few bytes per row, are not counted; the remainder short of a row is scaled in)
and the payload bytes on disk are divided by the conversations in the rows. `kept` is the share of positions
whose payload is kept; the ideal drop from full is 1 - kept.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill_pipe import chat, models  # noqa: E402
from distill_pipe.store import ShardWriter, create_store, head_from_model, make_codec  # noqa: E402
from distill_pipe.store.format import payload_keep  # noqa: E402
from distill_pipe.store.inspect import bytes_under  # noqa: E402


def write(path, codec_name, ids_NL, x_NLX, masks, head, hidden, vocab) -> int:
    codec = make_codec(codec_name)
    store = create_store(path, attrs={}, splits={"train": ids_NL}, codec=codec, shard_size=4, vocab_size=vocab,
                         hidden_size=hidden, head=head, target_masks=None if masks is None else {"train": masks})
    with ShardWriter(store, "train") as w:
        for k in range(store.num_shards("train")):
            a, b = store.shard_range("train", k)
            w.submit(k, {n: t.cpu() for n, t in codec.encode(x_NLX[a:b]).items()})
    return sum(bytes_under(store, f"train/{n}") for n in store.payload_names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--codecs", nargs="+", default=["factored", "dense-u8"])
    args = ap.parse_args()
    torch.manual_seed(0)
    src = models.resolve("builtin:smollm2-135m")
    tok = models.load_tokenizer(src)
    template = chat.resolve_template(tok, None, "builtin:smollm2-135m")
    records = chat.pydoc_conversations()
    convs = chat.render_conversations([r["messages"] for r in records], tok, template)
    ids, mask, stats = chat.pack(convs, args.seq_len, tok.eos_token_id, max_tokens=args.rows * args.seq_len)
    n_conv = stats.conversations
    keep = payload_keep(mask)
    real = int(stats.real_tokens)
    print(f"{ids.shape[0]} rows x {args.seq_len}: {n_conv} conversations, {real} tokens ({ids.size - real} padding), "
          f"{int(mask.sum())} target tokens; prompt share of the tokens {1 - mask.sum() / real:.1%}; payload kept at "
          f"{keep.sum()} of {keep.size} positions (kept {keep.mean():.1%})")

    model = models.load_causal_lm(src, dtype=torch.float32).eval()
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        hidden_NLD = torch.cat([model.model(input_ids=ids_t[i:i + 2]).last_hidden_state for i in range(0, len(ids), 2)])
        logits_NLV = torch.cat([model.lm_head(hidden_NLD[i:i + 2]) for i in range(0, len(ids), 2)])
    head = head_from_model(model)
    d, vocab = hidden_NLD.shape[-1], logits_NLV.shape[-1]
    # ragged: the kept positions' payload, densely packed into whole rows of the same length (the remainder
    # of fewer than seq_len positions is left out and the bytes scaled up by kept / packed positions)
    flat = torch.from_numpy(keep.reshape(-1))
    n_kept = int(flat.sum())
    n_rows = n_kept // args.seq_len
    scale = n_kept / (n_rows * args.seq_len)

    def ragged(x_NLX):
        kept = x_NLX.reshape(-1, x_NLX.shape[-1])[flat]
        return kept[: n_rows * args.seq_len].reshape(n_rows, args.seq_len, -1)

    print(f"\n| codec | full B/conv | zeroed B/conv | ragged B/conv | drop zeroed | drop ragged | ideal (1 - kept) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.codecs:
            x = hidden_NLD if make_codec(name).input_kind == "hidden" else logits_NLV
            h = head if name == "factored" else None
            hs = d if name == "factored" else None
            full = write(f"{tmp}/{name}-full", name, ids, x, None, h, hs, vocab)
            zeroed = write(f"{tmp}/{name}-zero", name, ids, x, mask, h, hs, vocab)
            rag = scale * write(f"{tmp}/{name}-ragged", name, np.zeros((n_rows, args.seq_len), np.int32), ragged(x),
                                None, h, hs, vocab)
            print(f"| {name} | {full / n_conv:,.0f} | {zeroed / n_conv:,.0f} | {rag / n_conv:,.0f} | "
                  f"{1 - zeroed / full:.1%} | {1 - rag / full:.1%} | {1 - keep.mean():.1%} |")


if __name__ == "__main__":
    main()
