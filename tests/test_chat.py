"""Conversations: rendering with chat templates (the builtin teacher's and others), the target mask checked
token by token against the rendered text, packing, the store's zeroed payload (format v2), and training /
evaluation counting only target tokens (accumulation and 2 ranks exact with uneven masks)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from distill_pipe import chat
from distill_pipe.chat import ChatError, Tokenized
from distill_pipe.store.codecs import CODEC_NAMES

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: BOS text, headers, content trimmed, <|eot_id|> with nothing after it
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML with {% generation %} around each assistant turn's content and end marker (for HF's own mask)
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
              "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol_tok():
    from distill_pipe import models

    return models.load_tokenizer(models.resolve("builtin:smollm2-135m"))


@pytest.fixture(scope="module")
def corpus():
    return [r["messages"] for r in chat.pydoc_conversations()]


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def expected_targets(messages, marker: str, strip: bool = False) -> str:
    return "".join((m["content"].strip() if strip else m["content"]) + marker
                   for m in messages if m["role"] == "assistant")


def check_token_by_token(tok, full: str, conv: Tokenized, spans: list[tuple[int, int]]) -> None:
    """Each token's character range in the rendered text (from decoding prefixes) lies wholly inside or
    wholly outside the target spans, and its mask says which."""
    ids = conv.input_ids.tolist()
    assert decode(tok, ids) == full
    ends = [len(decode(tok, ids[: k + 1])) for k in range(len(ids))]
    starts = [0] + ends[:-1]
    for k, (a, b) in enumerate(zip(starts, ends)):
        inside = any(s <= a and b <= e for s, e in spans)
        outside = all(b <= s or a >= e for s, e in spans)
        assert inside or outside, f"token {k} ({full[a:b]!r}) straddles a target boundary"
        assert conv.target_mask[k] == int(inside and k > 0), (k, full[a:b])


def target_spans(full: str, messages, marker: str, strip: bool = False) -> list[tuple[int, int]]:
    """Where each assistant turn (content + end-of-turn marker) lies in the rendered text, found by search."""
    spans, cursor = [], 0
    for m in messages:
        if m["role"] == "assistant":
            text = (m["content"].strip() if strip else m["content"]) + marker
            at = full.index(text, cursor)
            spans.append((at, at + len(text)))
            cursor = at + len(text)
    return spans


# ---------------------------------------------------------------- rendering


def test_builtin_teacher_template_round_trips_token_by_token(smol_tok, corpus):
    """SmolLM2-135M-Instruct's own template: the targets are each assistant turn + '<|im_end|>', not the
    newline after it; decoding the masked tokens gives back exactly the assistant turns."""
    template = chat.resolve_template(smol_tok, None, "builtin:smollm2-135m")
    convs = chat.render_conversations(corpus, smol_tok, template)
    assert len(convs) == len(corpus) >= 60
    for messages, conv in zip(corpus, convs):
        got = decode(smol_tok, conv.input_ids[conv.target_mask == 1])
        assert got == expected_targets(messages, "<|im_end|>")
    for messages, conv in zip(corpus[:12], convs[:12]):
        full = smol_tok.apply_chat_template(messages, tokenize=False)
        assert full.startswith("<|im_start|>system\n")  # the template's default system prompt, not a target
        check_token_by_token(smol_tok, full, conv, target_spans(full, messages, "<|im_end|>"))
    # the end-of-turn token is a target, the following newline is not
    conv = convs[0]
    eot = np.flatnonzero(conv.input_ids == smol_tok.convert_tokens_to_ids("<|im_end|>"))
    assert conv.target_mask[eot].tolist().count(1) == 2  # both assistant turns' markers, no other
    assert all(conv.target_mask[i + 1] == 0 for i in eot if i + 1 < len(conv.input_ids))


@pytest.mark.parametrize("template,marker,strip", [(LLAMA3, "<|eot_id|>", True), (CHATML, "<|im_end|>", False)])
def test_other_templates_given_in_params(smol_tok, corpus, template, marker, strip):
    messages = [[*m[:-1], {"role": "assistant", "content": m[-1]["content"] + "  "}] for m in corpus[:8]]
    convs = chat.render_conversations(messages, smol_tok, chat.resolve_template(smol_tok, template, "x"))
    for msgs, conv in zip(messages, convs):
        full = smol_tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
        assert decode(smol_tok, conv.input_ids[conv.target_mask == 1]) == expected_targets(msgs, marker, strip)
        check_token_by_token(smol_tok, full, conv, target_spans(full, msgs, marker, strip))


def test_mask_equals_transformers_generation_mask(smol_tok, corpus):
    """Where a template marks assistant text with {% generation %}, transformers' own assistant mask is the
    same as the prefix-rendering one (ids and mask)."""
    convs = chat.render_conversations(corpus, smol_tok, CHATML_GEN)
    for messages, conv in zip(corpus, convs):
        out = smol_tok.apply_chat_template(messages, chat_template=CHATML_GEN, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        assert out["input_ids"] == conv.input_ids.tolist()
        assert out["assistant_masks"] == conv.target_mask.tolist()


def test_targets_all_and_prompt_completion(smol_tok):
    template = chat.resolve_template(smol_tok, None, "t")
    rec = {"prompt": "What is 2+2?", "completion": "4."}
    msgs = chat.conversation(rec, "prompt_completion")
    assert msgs == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    conv_rec = {"q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "a": [{"role": "assistant", "content": "Hello."}]}
    msgs2 = chat.conversation(conv_rec, "prompt_completion", prompt_field="q", completion_field="a")
    assert [m["role"] for m in msgs2] == ["system", "user", "assistant"]
    (c,) = chat.render_conversations([msgs], smol_tok, template)
    assert decode(smol_tok, c.input_ids[c.target_mask == 1]) == "4.<|im_end|>"
    (a,) = chat.render_conversations([msgs], smol_tok, template, targets="all")
    assert a.input_ids.tolist() == c.input_ids.tolist()
    assert a.target_mask[0] == 0 and a.target_mask[1:].all()


def test_bad_records_and_templates_are_named(smol_tok, tiny_teacher):
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(tiny_teacher)
    with pytest.raises(ChatError, match="has no chat template; set data.chat_template"):
        chat.resolve_template(tiny, None, "my-teacher")
    with pytest.raises(ChatError, match="record 3 has no field 'messages' .*set data.messages_field"):
        chat.conversation({"text": "x"}, "chat", where="record 3")
    with pytest.raises(ChatError, match=r"messages\[1\] is not a \{role, content\} message"):
        chat.conversation({"messages": [{"role": "user", "content": "a"}, "oops"]}, "chat")
    with pytest.raises(ChatError, match="non-text content"):
        chat.conversation({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "chat")
    with pytest.raises(ChatError, match="has no field 'completion'.*set data.completion_field"):
        chat.conversation({"prompt": "a"}, "prompt_completion")
    # a template whose prefixes are not prefixes of the whole render (it marks the last message)
    odd = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ChatError, match="conversation 0: the chat template does not render this conversation turn "
                                        "by turn.*set data.chat_template"):
        chat.render_conversations([msgs], smol_tok, odd)
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatError, match="conversation 0: the chat template fails on this conversation \\(roles must "
                                        "alternate\\)"):
        chat.render_conversations([msgs], smol_tok, failing)


# ---------------------------------------------------------------- packing


def conv(n: int, targets: list[int], first: int = 0) -> Tokenized:
    ids = np.arange(first, first + n, dtype=np.int64)
    mask = np.zeros(n, dtype=np.uint8)
    mask[targets] = 1
    return Tokenized(ids, mask)


def test_pack_whole_conversations_best_fit_pad_and_truncate():
    convs = [conv(6, [3, 4, 5], 100), conv(3, [2], 200), conv(5, [4], 300), conv(12, [1, 10, 11], 400),
             conv(4, [], 500), conv(2, [1], 600)]
    ids, mask, st = chat.pack(convs, seq_len=8, pad_id=-1)
    # row 0: conv0 (6) then conv5 (2: fits exactly); row 1: conv1 (3) + conv2 (5); row 2: conv3 cut to 8
    assert ids.tolist() == [[100, 101, 102, 103, 104, 105, 600, 601],
                            [200, 201, 202, 300, 301, 302, 303, 304],
                            [400, 401, 402, 403, 404, 405, 406, 407]]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    assert (st.conversations, st.truncated, st.dropped_target_tokens, st.skipped_no_target) == (5, 1, 2, 1)
    assert (st.rows, st.real_tokens, st.target_tokens, st.padding_tokens) == (3, 24, 7, 0)
    ids, mask, st = chat.pack([conv(5, [4]), conv(5, [1, 4])], seq_len=8, pad_id=-1)
    assert ids[0, 5:].tolist() == [-1] * 3 and mask[:, 5:].sum() == 0 and st.padding_tokens == 6
    # a token cap keeps whole rows
    ids, mask, st = chat.pack([conv(5, [4])] * 5, seq_len=8, pad_id=-1, max_tokens=17)
    assert ids.shape == (2, 8) and st.rows == 2 and st.conversations == 2 and st.dropped_target_tokens == 3
    assert (mask[:, 0] == 0).all()


# ---------------------------------------------------------------- the store


V, L = 64, 16


def random_masks(n: int, seed: int) -> np.ndarray:
    """Uneven target masks: row i has targets from 2 + (5*i mod 11) on, and one row has none."""
    m = np.zeros((n, L), np.uint8)
    for i in range(n):
        m[i, 2 + (5 * i) % 11:] = 1
    m[min(3, n - 1)] = 0
    m[:, 0] = 0
    return m


def write_store(path, codec_name: str, ids: dict, logits: dict, masks: dict | None, shard_size: int = 4):
    from distill_pipe.store import ShardWriter, create_store, make_codec

    codec = make_codec(codec_name)
    head = None
    hidden = None
    if codec.input_kind == "hidden":
        g = torch.Generator().manual_seed(5)
        head, hidden = {"weight": torch.randn(V, 8, generator=g)}, 8
    store = create_store(path, attrs={}, splits=ids, codec=codec, shard_size=shard_size, vocab_size=V,
                         hidden_size=hidden, head=head, target_masks=masks)
    for split in ids:
        with ShardWriter(store, split) as w:
            for k in range(store.num_shards(split)):
                a, b = store.shard_range(split, k)
                w.submit(k, {n: t.cpu() for n, t in codec.encode(logits[split][a:b]).items()})
    return store


@pytest.mark.parametrize("codec_name", CODEC_NAMES)
def test_store_keeps_payload_only_where_the_next_token_is_a_target(tmp_path, codec_name):
    from distill_pipe.store import open_store
    from distill_pipe.store.format import payload_keep

    g = torch.Generator().manual_seed(0)
    n = {"train": 10, "validation": 5}
    ids = {s: torch.randint(0, V, (k, L), generator=g).numpy().astype(np.int32) for s, k in n.items()}
    last = 8 if codec_name == "factored" else V
    x = {s: torch.randn(k, L, last, generator=g) * 3 for s, k in n.items()}
    masks = {s: random_masks(k, 1) for s, k in n.items()}
    plain = write_store(tmp_path / "plain", codec_name, ids, x, None)
    masked = write_store(tmp_path / "masked", codec_name, ids, x, masks)
    assert plain.info["format_version"] == 1 and plain.target_mask("train") is None
    masked = open_store(tmp_path / "masked")
    assert masked.info["format_version"] == 2
    for s in n:
        assert np.array_equal(masked.target_mask(s)[...], masks[s])
        keep = payload_keep(masks[s])
        for name in masked.payload_names:
            a = masked.array(s, name)[...]
            fill = 255 if name == "logprobs_u8" else 0  # the spec's masked_fill
            assert (a[~keep] == fill).all()  # a constant where nothing is predicted
            assert np.array_equal(a[keep], plain.array(s, name)[...][keep])  # the same payload elsewhere
        got = masked.teacher_batch(s, list(range(n[s])))
        want = plain.teacher_batch(s, list(range(n[s])))
        flat = torch.from_numpy(keep.reshape(-1)).nonzero().squeeze(1)
        if masked.codec.sparse:
            t1 = masked.codec.params.get("temperature", 1.0)
            a_, b_ = (x.sparse_targets(0, x.num_positions, t1).select(flat) for x in (got, want))
            for fa, fb in ((a_.ids_CK, b_.ids_CK), (a_.probs_CK, b_.probs_CK), (a_.rest_C, b_.rest_C)):
                assert (fa is None and fb is None) or torch.equal(fa, fb)
        else:
            assert torch.equal(got.logits()[flat], want.logits()[flat])
    assert masked.verify() == []


def test_older_reader_refuses_a_masked_store_and_reads_a_plain_one(tmp_path, monkeypatch):
    import distill_pipe.store.reader as reader
    from distill_pipe.store import StoreVersionError, open_store

    ids = {"train": np.zeros((4, L), np.int32), "validation": np.zeros((2, L), np.int32)}
    x = {s: torch.randn(len(a), L, V) for s, a in ids.items()}
    write_store(tmp_path / "masked", "dense-bf16", ids, x, {s: random_masks(len(a), 0) for s, a in ids.items()})
    write_store(tmp_path / "plain", "dense-bf16", ids, x, None)
    monkeypatch.setattr(reader, "FORMAT_VERSION", 1)  # a distill-pipe from before target masks
    with pytest.raises(StoreVersionError, match="has store format version 2, this distill-pipe .* reads up to 1: "
                                                "upgrade distill-pipe"):
        open_store(tmp_path / "masked")
    assert open_store(tmp_path / "plain").info["format_version"] == 1


# ---------------------------------------------------------------- training and evaluation


def masked_data(n_train=21, n_val=6):
    from test_trainer import tiny_data

    data = tiny_data(n_train, n_val)
    masks = {"train": random_masks(n_train, 0), "validation": random_masks(n_val, 1)}
    return data, masks


def kd_store(tmp_path, data, masks, zero: bool = True):
    g = torch.Generator().manual_seed(2)
    x = {s: torch.randn(len(a), L, V, generator=g) * 3 for s, a in data.items()}
    return write_store(tmp_path, "dense-bf16", data, x, masks if zero else None)


def test_ce_with_target_masks_equals_reference_and_accumulation_is_exact(tmp_path):
    from test_trainer import assert_same_weights, cfg, reference_ce_training, train

    from distill_pipe.losses import IGNORE_INDEX, shift_for_next_token
    from distill_pipe.trainer import DistillTrainer

    data, masks = masked_data()

    def targets_fn(ids, idx):
        t = shift_for_next_token(ids)
        t[:, :-1][torch.from_numpy(masks["train"][idx][:, 1:] == 0)] = IGNORE_INDEX
        return t

    _, w_4x2 = train(tmp_path / "a", data, cfg(batch_size=2, gradient_accumulation_steps=4),
                     trainer_cls=DistillTrainer, target_masks=masks)
    t, w_1x8 = train(tmp_path / "b", data, cfg(batch_size=8, gradient_accumulation_steps=1),
                     trainer_cls=DistillTrainer, target_masks=masks)
    assert_same_weights(w_4x2, w_1x8)
    assert_same_weights(w_1x8, reference_ce_training(data, cfg(), 8, targets_fn))
    # every token count is of targets only
    from distill_pipe.metrics import read_history

    first = read_history(tmp_path / "b" / "dvclive", "train")[0]
    idx = t.step_indices(0)
    assert int(first["tokens"]) == int(masks["train"][idx][:, 1:].sum())
    last_eval = read_history(tmp_path / "b" / "dvclive", "eval")[-1]
    assert int(last_eval["eval_tokens"]) == int(masks["validation"][:, 1:].sum())


def test_kd_with_a_zeroed_store_equals_a_full_store_and_accumulation_is_exact(tmp_path):
    """The zeroed payload is never read: KD on the masked store gives the weights of KD on a store that kept
    every position (same masks given to the trainer); 4x2 == 1x8."""
    from test_trainer import assert_same_weights, cfg, train

    from distill_pipe.trainer import DistillTrainer

    data, masks = masked_data()
    zeroed = kd_store(tmp_path / "z", data, masks)
    full = kd_store(tmp_path / "f", data, masks, zero=False)
    c = dict(alpha=0.4, temperature=2.0, loss_chunk_size=5, max_steps=3)
    kw = dict(trainer_cls=DistillTrainer, vocab_size=V)
    tm = {s: zeroed.target_mask(s) for s in data}
    _, w_z = train(tmp_path / "a", data, cfg(batch_size=2, gradient_accumulation_steps=4, **c), store=zeroed,
                   target_masks=tm, **kw)
    _, w_z18 = train(tmp_path / "b", data, cfg(batch_size=8, gradient_accumulation_steps=1, **c), store=zeroed,
                     target_masks=tm, **kw)
    _, w_f = train(tmp_path / "c", data, cfg(batch_size=2, gradient_accumulation_steps=4, **c), store=full,
                   target_masks=masks, **kw)
    assert_same_weights(w_z, w_f, atol=0)  # bit for bit: no zeroed position reaches the loss
    assert_same_weights(w_z, w_z18, atol=KD_ATOL)


# KD regroups its sums when the batch is split otherwise (chunks over other flattened positions): the first
# step's gradients agree within 1.5e-8 (largest 0.05), but one coordinate's gradient is 1.8e-9, below AdamW's
# eps (1e-8), where the update lr * g / (|g| + eps) turns that rounding into ~8e-6 of weight (measured).
KD_ATOL = 2e-5


def _kd_trainer_kw(store_path: str) -> dict:
    """Each rank's DistillTrainer arguments: the masked store, opened in the rank's own process."""
    from distill_pipe.store import open_store
    from distill_pipe.trainer import DistillTrainer

    store = open_store(store_path)
    return {"cls": DistillTrainer, "store": store, "vocab_size": V,
            "target_masks": {s: store.target_mask(s) for s in ("train", "validation")}}


def test_two_ranks_equal_one_process_with_uneven_masks(tmp_path):
    from distill_pipe.metrics import read_history
    from test_trainer import assert_same_weights, cfg, run_ranks, train

    from distill_pipe.trainer import DistillTrainer

    data, masks = masked_data()
    store = kd_store(tmp_path / "s", data, masks)
    c2 = cfg(alpha=0.4, batch_size=2, gradient_accumulation_steps=2, eval_steps=2, save_steps=100)
    w2 = run_ranks(tmp_path / "r2", c2, data, trainer_kw=functools.partial(_kd_trainer_kw, str(tmp_path / "s")))
    c = cfg(alpha=0.4, batch_size=4, gradient_accumulation_steps=2, eval_steps=2, save_steps=100)
    _, w1 = train(tmp_path / "r1", data, c, trainer_cls=DistillTrainer, store=store, vocab_size=V,
                  target_masks={s: store.target_mask(s) for s in data})
    assert_same_weights(w2, w1, atol=KD_ATOL)
    e1, e2 = read_history(tmp_path / "r1" / "dvclive", "eval"), read_history(tmp_path / "r2" / "dvclive", "eval")
    assert [r["eval_tokens"] for r in e1] == [r["eval_tokens"] for r in e2]
    assert int(e1[0]["eval_tokens"]) == int(masks["validation"][:, 1:].sum())
    for a, b in zip(e1, e2):
        assert float(a["eval_loss"]) == pytest.approx(float(b["eval_loss"]), rel=1e-5)


def test_evaluate_scores_only_targets(tmp_path):
    """evaluate.score on a masked store: CE/KL/agreement over exactly the target positions (explicit loop)."""
    from test_trainer import tiny_model

    from distill_pipe.evaluate import score

    data, masks = masked_data(8, 6)
    store = kd_store(tmp_path / "s", data, masks)
    model = tiny_model(1).eval()
    got = score(model, store, list(range(6)), batch_size=4, vocab_size=V, chunk=5)
    ce = kl = agree = 0.0
    n = 0
    with torch.no_grad():
        for i in range(6):
            ids = torch.as_tensor(data["validation"][i : i + 1], dtype=torch.long)
            logq = torch.log_softmax(model(ids).logits[0].double(), -1)
            logp = torch.log_softmax(store.teacher_batch("validation", [i]).logits().double(), -1)
            for t in range(1, L):
                if masks["validation"][i, t]:
                    y = int(ids[0, t])
                    ce -= float(logq[t - 1, y])
                    kl += float((logp[t - 1].exp() * (logp[t - 1] - logq[t - 1])).sum())
                    agree += float(logq[t - 1].argmax() == logp[t - 1].argmax())
                    n += 1
    assert got["tokens"] == n == int(masks["validation"][:, 1:].sum())
    assert got["ce"] == pytest.approx(ce / n, rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-4, abs=1e-6)
    assert got["top1_agreement"] == pytest.approx(agree / n)


# ---------------------------------------------------------------- prepare, end to end


def prepare_params(root, source, teacher, **data):
    """params.yaml in `root`: the repo's, with `source` and data keys (seq_len 128 unless given)."""
    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"source": str(source), "seq_len": 128, "max_train_tokens": None,
                           "max_validation_tokens": None, "validation_fraction": 0.25, **data})
    params["teacher"]["model"] = str(teacher)
    params["teacher_logits"].update(codec="dense-bf16", shard_size=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def split_into_conversations(row_ids, row_mask, by_ids: dict) -> list:
    """A packed row -> the conversations it holds (keys of by_ids), checking the row's mask is theirs."""
    found, p, ids = [], 0, row_ids.tolist()
    lengths = sorted({len(k) for k in by_ids}, reverse=True)
    while p < len(ids):
        key = next((tuple(ids[p:p + n]) for n in lengths if tuple(ids[p:p + n]) in by_ids), None)
        if key is None:
            break
        assert row_mask[p:p + len(key)].tolist() == by_ids[key].tolist()
        found.append(key)
        p += len(key)
    return found, p


def test_prepare_builtin_chat_corpus_packs_every_conversation_with_its_mask(tmp_path, monkeypatch, smol_tok, corpus):
    """builtin:pydoc-chat with the builtin teacher's template: every row is whole conversations then padding
    (mask 0); each conversation's ids and mask are exactly its rendering; each conversation is in one split."""
    from conftest import run_cli

    from distill_pipe.data import open_tokens

    prepare_params(tmp_path, "builtin:pydoc-chat", "builtin:smollm2-135m", format="chat", seq_len=256)
    monkeypatch.chdir(tmp_path)
    code, out = run_cli("prepare")
    assert code == 0, out
    root = open_tokens("stages/prepare/tokens.zarr")
    assert root.attrs["format_version"] == 2 and root.attrs["chat"]["format"] == "chat"
    convs = chat.render_conversations(corpus, smol_tok, chat.resolve_template(smol_tok, None, "t"))
    by_ids = {tuple(c.input_ids[:256].tolist()): c.target_mask[:256] for c in convs}
    seen = []
    for split in ("train", "validation"):
        ids, mask = root[split]["input_ids"][...], root[split]["target_mask"][...]
        assert ids.shape == mask.shape and mask.dtype == np.uint8 and (mask[:, 0] == 0).all()
        for r in range(len(ids)):
            found, end = split_into_conversations(ids[r], mask[r], by_ids)
            assert found and (ids[r, end:] == smol_tok.eos_token_id).all() and not mask[r, end:].any()
            seen += found
        s = root.attrs["splits"][split]
        assert s["target_tokens"] == int(mask.sum()) and s["num_sequences"] == len(ids) and s["tokens"] == ids.size
        assert s["real_tokens"] + s["padding_tokens"] == ids.size
    assert sorted(seen) == sorted(by_ids)  # each conversation exactly once, in one split


# The tiny teacher's tokenizer has no template: one in params, its EOS as the end-of-turn marker.
TINY = ("{% for m in messages %}{{ m['role'][0] + ': ' + m['content'] + '<eos>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'a: ' }}{% endif %}")

CHAT_RECORDS = [
    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6"}]},
] * 6


def test_prepare_chat_jsonl_and_prompt_completion_parquet_with_a_template_in_params(tmp_path, monkeypatch,
                                                                                   tiny_teacher):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import run_cli
    from transformers import AutoTokenizer

    from distill_pipe.data import open_tokens

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    monkeypatch.chdir(tmp_path)
    recs = [{"messages": [{"role": m["role"], "content": f"{m['content']} #{i}"} for m in r["messages"]]}
            for i, r in enumerate(CHAT_RECORDS)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="chat", chat_template=TINY, seq_len=128)
    code, out = run_cli("prepare")
    assert code == 0, out
    root = open_tokens("stages/prepare/tokens.zarr")
    got = [decode(tok, root[s]["input_ids"][...][root[s]["target_mask"][...] == 1]) for s in ("train", "validation")]
    want = {"".join(m["content"] + "<eos>" for m in r["messages"] if m["role"] == "assistant") for r in recs}
    assert len("".join(got)) == sum(len(w) for w in want)
    assert all(w in "".join(got) for w in want)
    assert all(root.attrs["splits"][s]["truncated"] == 0 for s in ("train", "validation"))

    pq.write_table(pa.table({"q": [f"Question {i}?" for i in range(12)], "a": [f"Answer {i}." for i in range(12)]}),
                   tmp_path / "pc.parquet")
    prepare_params(tmp_path, "pc.parquet", tiny_teacher, format="prompt_completion", prompt_field="q",
                   completion_field="a", chat_template=TINY, seq_len=128)
    code, out = run_cli("prepare")
    assert code == 0, out
    root = open_tokens("stages/prepare/tokens.zarr")
    got = "".join(decode(tok, root[s]["input_ids"][...][root[s]["target_mask"][...] == 1]) for s in ("train", "validation"))
    assert sorted(got.split("<eos>")[:-1]) == sorted(f"Answer {i}." for i in range(12))


def test_prepare_chat_errors_are_one_line(tmp_path, monkeypatch, tiny_teacher):
    import json

    from conftest import assert_one_line_error, run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS))
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="chat")
    assert_one_line_error(*run_cli("prepare"), "has no chat template; set data.chat_template")
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="chat", chat_template=TINY, messages_field="conv")
    assert_one_line_error(*run_cli("prepare"), "has no field 'conv' (has: messages); set data.messages_field")
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="prompt_completion", chat_template=TINY)
    assert_one_line_error(*run_cli("prepare"), "has no field 'prompt' (has: messages); set data.prompt_field")
    prepare_params(tmp_path, "builtin:pydoc-chat", tiny_teacher)
    assert_one_line_error(*run_cli("prepare"), "builtin:pydoc-chat holds conversations: use it with data.format=chat")
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="dialogue")
    assert_one_line_error(*run_cli("prepare"), "data.format must be one of text, chat, prompt_completion")
    no_assistant = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_assistant))
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="chat", chat_template=TINY)
    assert_one_line_error(*run_cli("prepare"), "has a target token (an assistant turn)")
    assert not (tmp_path / "stages" / "prepare" / "tokens.zarr").exists()  # nothing half-written


def test_chat_corpus_through_every_stage(tmp_path, monkeypatch, tiny_teacher):
    """prepare -> teacher-logits (store v2, payload left out where nothing is trained) -> train (KD and
    CE-only) -> evaluate, on conversations; every count is of target tokens."""
    import json

    import yaml
    from conftest import run_cli

    from distill_pipe.store import open_store
    from distill_pipe.store.format import payload_keep

    monkeypatch.chdir(tmp_path)
    recs = [{"messages": [{"role": m["role"], "content": f"{m['content']} #{i}"} for m in r["messages"]]}
            for i, r in enumerate(CHAT_RECORDS * 2)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare_params(tmp_path, "chat.jsonl", tiny_teacher, format="chat", chat_template=TINY, seq_len=128)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"].update(batch_size=2, max_steps=2, eval_steps=1, save_steps=2, warmup_steps=0, calibration_tokens=64)
    params["students"] = {"kd": {"init": {"config": {"num_hidden_layers": 1}}, "alpha": 0.5},
                          "ce": {"init": {"config": {"num_hidden_layers": 1}}, "alpha": 1.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["prepare"], ["teacher-logits"], ["train", "--student", "kd"], ["train", "--student", "ce"],
                ["evaluate"]):
        code, out = run_cli(*cmd)
        assert code == 0, (cmd, out)
    store = open_store("stages/teacher_logits/logits.zarr")
    assert store.info["format_version"] == 2
    mask = store.target_mask("validation")[...]
    keep = payload_keep(mask)
    payload = store.array("validation", "logits_bf16")[...]
    assert not payload[~keep].any() and payload[keep].any()
    targets = int(mask[:, 1:].sum())
    metrics = json.loads((tmp_path / "stages" / "evaluate" / "metrics.json").read_text())
    assert metrics["teacher"]["tokens"] == metrics["kd"]["tokens"] == metrics["ce"]["tokens"] == targets
    from distill_pipe.metrics import read_history

    for student in ("kd", "ce"):
        assert all(int(r["eval_tokens"]) == targets for r in read_history(f"stages/dvclive/{student}", "eval"))


def test_tokens_store_from_a_newer_release_is_refused(tmp_path):
    import zarr

    from distill_pipe.data import TOKENS_FORMAT_VERSION, DataError, open_tokens, write_tokens

    arrays = {s: np.zeros((2, 8), np.int32) for s in ("train", "validation")}
    write_tokens(tmp_path / "t.zarr", arrays, {"format": "distill-pipe-tokens", "format_version": 1})
    assert open_tokens(tmp_path / "t.zarr").attrs["format_version"] == 1  # a store from before masks reads
    zarr.open_group(str(tmp_path / "t.zarr"), mode="r+").attrs["format_version"] = TOKENS_FORMAT_VERSION + 1
    with pytest.raises(DataError, match=f"tokens format version {TOKENS_FORMAT_VERSION + 1}, this distill-pipe reads "
                                        f"up to {TOKENS_FORMAT_VERSION}: upgrade distill-pipe"):
        open_tokens(tmp_path / "t.zarr")
