"""Trainer exactness against naive references: accumulation, ranks, resume, plain CE; early stopping,
checkpoint atomicity and keep_last; KD plumbing (vocab slicing, eval normalisation) with a fake store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_pipe.config import TrainConfig
from distill_pipe.losses import IGNORE_INDEX, shift_for_next_token
from distill_pipe.metrics import read_history
from distill_pipe.store.codecs import DenseBF16Codec
from distill_pipe.trainer import CheckpointError, DistillTrainer

V, L = 64, 16


def tiny_model(seed: int = 0, vocab_size: int = V, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def tiny_data(n_train: int = 21, n_val: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # a learnable pattern (x_{t+1} = x_t + 1 mod V, with noise), so losses move
    start = rng.integers(0, V, (n_train + n_val, 1))
    ids = (start + np.arange(L)) % V
    noise = rng.random(ids.shape) < 0.2
    ids = np.where(noise, rng.integers(0, V, ids.shape), ids).astype(np.int32)
    return {"train": ids[:n_train], "validation": ids[n_train:]}


def masked_targets(ids_BL: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Uneven token counts: sequence i loses its first (7*i mod L) targets (some lose all)."""
    t = shift_for_next_token(ids_BL)
    for row, i in enumerate(indices):
        t[row, : (7 * i) % L] = IGNORE_INDEX
    return t


class MaskedTrainer(DistillTrainer):
    def make_targets(self, input_ids_BL, split, indices):
        return masked_targets(input_ids_BL, indices)


def cfg(**kw) -> TrainConfig:
    base = dict(alpha=1.0, batch_size=2, gradient_accumulation_steps=4, learning_rate=3e-3, warmup_steps=2,
                max_steps=None, num_epochs=2.0, max_grad_norm=1.0, eval_steps=100, save_steps=100, keep_last=2, seed=3)
    base.update(kw)
    c = TrainConfig(**base)
    c.validate("train")
    return c


def params_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


def train(tmp: Path, data: dict, c: TrainConfig, trainer_cls=MaskedTrainer, seed: int = 0, tied: bool = False, **kw):
    model = tiny_model(seed, tied=tied)
    t = trainer_cls(model, c, data, out_dir=tmp, show_progress=False, **kw)
    t.train()
    return t, params_of(model)


# ---------------------------------------------------------------- exactness


def reference_ce_training(data: dict, c: TrainConfig, global_batch: int, targets_fn, tied: bool = False) -> dict:
    """Plain CE training written out: one forward per optimizer step over the whole global batch,
    F.cross_entropy mean over the step's tokens, AdamW, clipping, warmup + cosine, the same data order."""
    model = tiny_model(0, tied=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, weight_decay=0.0)
    n = len(data["train"])
    per_epoch = math.ceil(n / global_batch)
    total = math.ceil(c.num_epochs * per_epoch)
    for s in range(total):
        epoch, pos = divmod(s, per_epoch)
        idx = np.random.default_rng([c.seed, epoch]).permutation(n)[pos * global_batch:(pos + 1) * global_batch]
        ids = torch.from_numpy(data["train"][idx]).long()
        targets = targets_fn(ids, idx.tolist())
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
        w = c.warmup_steps
        mult = (s + 1) / w if s < w else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - w) / (total - w - 1))))
        for g in opt.param_groups:
            g["lr"] = c.learning_rate * mult
        opt.step()
        opt.zero_grad()
    return params_of(model)


def test_accumulation_splits_give_the_same_weights_uneven_tokens(tmp_path):
    # 21 sequences, global batch 8: steps of 8, 8, 5 sequences; masked targets make token counts uneven.
    data = tiny_data(21)
    _, w_4x2 = train(tmp_path / "a", data, cfg(batch_size=2, gradient_accumulation_steps=4))
    t, w_1x8 = train(tmp_path / "b", data, cfg(batch_size=8, gradient_accumulation_steps=1))
    _, w_8x1 = train(tmp_path / "c", data, cfg(batch_size=1, gradient_accumulation_steps=8))
    assert t.total_steps == 6 and t.steps_per_epoch == 3
    assert_same_weights(w_4x2, w_1x8)
    assert_same_weights(w_8x1, w_1x8)
    # and each equals plain CE training: the mean over the step's tokens, one forward per step
    ref = reference_ce_training(data, cfg(), 8, masked_targets)
    assert_same_weights(w_1x8, ref)
    assert_same_weights(w_4x2, ref)


def test_per_microbatch_mean_would_differ(tmp_path):
    """The test above can fail: normalising each micro-batch by its own count gives other weights."""

    class PerMicroMean(MaskedTrainer):
        def compute_loss(self, model, batch):
            sums = super().compute_loss(model, batch)
            sums.loss = sums.loss / max(sums.num_tokens, 1) * batch.num_tokens / 2  # wrong on purpose
            return sums

    data = tiny_data(21)
    _, good = train(tmp_path / "a", data, cfg(batch_size=2, gradient_accumulation_steps=4))
    _, bad = train(tmp_path / "b", data, cfg(batch_size=2, gradient_accumulation_steps=4), trainer_cls=PerMicroMean)
    with pytest.raises(AssertionError):
        assert_same_weights(good, bad)


@pytest.mark.parametrize("tied", [False, True])
def test_alpha_one_equals_plain_ce_training(tmp_path, tied):
    data = tiny_data(16)
    c = cfg(batch_size=2, gradient_accumulation_steps=2, num_epochs=1.5)  # 2 micro-batches: .grad exists in the 2nd
    t, w = train(tmp_path, data, c, trainer_cls=DistillTrainer, tied=tied)
    ref = reference_ce_training(data, c, 4, lambda ids, idx: shift_for_next_token(ids), tied=tied)
    # tied: the head's and the embedding's gradients meet in another order than in the reference's autograd (the
    # same with the head's gradient through autograd: 4.6e-6 at most, in weights that AdamW moved from near-zero
    # gradients), so the tolerance is float noise a little above the untied one's
    assert_same_weights(w, ref, atol=1e-5 if tied else 2e-6)
    assert t.store is None and t.step == 6  # 16 sequences / 4 = 4 steps per epoch, 1.5 epochs
    rows = read_history(tmp_path / "dvclive", "train")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(int(r["tokens"]) == 4 * (L - 1) for r in rows)
    assert float(rows[0]["kl"]) == 0 and float(rows[0]["loss"]) == pytest.approx(float(rows[0]["ce"]))


def _fsdp_worker(rank: int, world: int, out: str, c: TrainConfig, data: dict, param_dtype,
                 trainer_kw=None, tied: bool = False) -> None:
    """trainer_kw: None (a MaskedTrainer) or a picklable () -> {"cls": ..., **constructor kwargs}."""
    import torch.distributed as dist

    from distill_pipe.distributed import DistInfo, fsdp_wrap
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    # Rendezvous through a file in the run's own folder, not a TCP port: a port just freed can be taken by a
    # process of an earlier test still retrying its own store there (seen: a rank aborting at start, in a
    # full run only).
    Path(out).mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world)
    try:
        model = fsdp_wrap(tiny_model(0, tied=tied), param_dtype)
        kw = trainer_kw() if trainer_kw else {}
        t = kw.pop("cls", MaskedTrainer)(model, c, data, out_dir=out, show_progress=False,
                                         info=DistInfo(rank, world, rank, torch.device("cpu")), **kw)
        t.train()
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({k: v.clone() for k, v in sd.items()}, Path(out) / "weights.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(out: Path, c: TrainConfig, data: dict, world: int = 2, param_dtype=None, trainer_kw=None,
              tied: bool = False) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(world, str(out), c, data, param_dtype, trainer_kw, tied), nprocs=world,
             join=True)
    return torch.load(out / "weights.pt")


@pytest.mark.parametrize("tied", [False, True])
def test_two_fsdp_ranks_equal_one_process(tmp_path, tied):
    """2 gloo ranks under FSDP2 (gradients SUMMED, not averaged over ranks) == 1 process, same global batch.
    21 sequences / 8 per step: the last step has 5, so a rank gets a padding micro-batch. Tied and untied heads:
    the loss adds the head's gradient into the (gathered) weight's .grad itself, which FSDP2 then reduces."""
    data = tiny_data(21)
    c2 = cfg(batch_size=2, gradient_accumulation_steps=2, save_steps=4, eval_steps=2)
    w2 = run_ranks(tmp_path / "r2", c2, data, tied=tied)
    _, w1 = train(tmp_path / "r1", data, cfg(batch_size=4, gradient_accumulation_steps=2, save_steps=4, eval_steps=2),
                  tied=tied)
    assert_same_weights(w2, w1)
    # eval uses the same normalisation across ranks: identical eval curves
    e1 = read_history(tmp_path / "r1" / "dvclive", "eval")
    e2 = read_history(tmp_path / "r2" / "dvclive", "eval")
    assert [r["step"] for r in e1] == [r["step"] for r in e2] == ["2", "4", "6"]
    for a, b in zip(e1, e2):
        assert float(a["eval_loss"]) == pytest.approx(float(b["eval_loss"]), rel=1e-5)
        assert a["eval_tokens"] == b["eval_tokens"]


# ---------------------------------------------------------------- resume


def test_in_process_stop_and_resume_reproduces_the_run(tmp_path):
    data = tiny_data(21)
    c = cfg(batch_size=2, gradient_accumulation_steps=2, num_epochs=3.0, save_steps=3, eval_steps=2,
            early_stop_patience=5)
    full, w_full = train(tmp_path / "full", data, c)

    model = tiny_model(0)
    first = MaskedTrainer(model, c, data, out_dir=tmp_path / "cut", show_progress=False)
    first.train(until_step=5)  # "dies" at step 5; the last checkpoint is step 3
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-000003"
    model = tiny_model(1)  # different weights: everything must come from the checkpoint
    second = MaskedTrainer(model, c, data, out_dir=tmp_path / "cut", show_progress=False)
    second.load_checkpoint(second.latest_checkpoint())
    assert second.step == 3
    second.train()
    assert_same_weights(params_of(model), w_full, atol=0)
    # the same loss trajectory, step by step (rows 4-5 of the dead run were dropped and redone)
    assert history(tmp_path / "cut", "train") == history(tmp_path / "full", "train")
    assert history(tmp_path / "cut", "eval") == history(tmp_path / "full", "eval")
    assert len(history(tmp_path / "cut", "train")) == full.total_steps
    assert second.early.state() == full.early.state()
    assert second.tokens_seen == full.tokens_seen


def history(out: Path, name: str) -> list[dict]:
    """The run's history rows (dvclive) without the timing column."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_history(out / "dvclive", name)]


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    data = tiny_data(12)
    c = cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=2, save_steps=1)
    train(tmp_path, data, c, fingerprint={"train": {"alpha": 1.0}, "data": "sha256:a"})
    t = MaskedTrainer(tiny_model(0), c, data, out_dir=tmp_path, show_progress=False,
                      fingerprint={"train": {"alpha": 0.5}, "data": "sha256:a"})
    with pytest.raises(CheckpointError, match=r"different config \(train.alpha differ\)"):
        t.load_checkpoint(t.latest_checkpoint())


# ---------------------------------------------------------------- checkpoints


def test_keep_last_and_latest_pointer(tmp_path):
    data = tiny_data(12)
    t, _ = train(tmp_path, data, cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=5, save_steps=1,
                                     keep_last=2))
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-000004", "step-000005"]
    assert t.latest_checkpoint() == ck / "step-000005"


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    data = tiny_data(12)
    c = cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=4, save_steps=2)
    model = tiny_model(0)
    t = MaskedTrainer(model, c, data, out_dir=tmp_path, show_progress=False)
    t.train(until_step=2)
    w2 = params_of(model)
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        if str(f).endswith("trainer.pt"):
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.train()  # steps 3, 4, then the save at 4 dies after writing model and optimizer
    monkeypatch.undo()
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text() == "step-000002" and (ck / ".tmp-step-000004").exists()
    fresh = tiny_model(5)
    t2 = MaskedTrainer(fresh, c, data, out_dir=tmp_path, show_progress=False)
    t2.clean_stale_temp()
    assert not (ck / ".tmp-step-000004").exists()
    t2.load_checkpoint(t2.latest_checkpoint())
    assert t2.step == 2
    assert_same_weights(params_of(fresh), w2, atol=0)


# ---------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_evals_without_improvement(tmp_path, monkeypatch):
    data = tiny_data(12)
    c = cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=20, eval_steps=1, save_steps=50,
            early_stop_patience=2, early_stop_min_delta=0.05)
    scripted = iter([3.0, 2.5, 2.49, 2.6, 2.0])  # 2.49 is not better by > 0.05; 2.6 is worse: stop at step 4
    best_calls = []
    t = MaskedTrainer(tiny_model(0), c, data, out_dir=tmp_path, show_progress=False,
                      on_best=lambda tr: best_calls.append(tr.step))
    monkeypatch.setattr(t, "evaluate", lambda: {"eval_loss": next(scripted), "eval_ce": 0.0, "eval_kl": 0.0,
                                                "eval_ppl": 1.0, "eval_tokens": 1})
    out = t.train()
    assert out["early_stopped"] and out["steps"] == 4 and out["best_step"] == 2 and out["best_eval_loss"] == 2.5
    assert best_calls == [1, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000004"  # saved at the stop
    # a resumed run knows it stopped and does nothing more
    t2 = MaskedTrainer(tiny_model(0), c, data, out_dir=tmp_path, show_progress=False)
    t2.load_checkpoint(t2.latest_checkpoint())
    assert t2.train()["steps"] == 4


def test_no_early_stop_without_patience(tmp_path, monkeypatch):
    data = tiny_data(12)
    c = cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=5, eval_steps=1, save_steps=50)
    t = MaskedTrainer(tiny_model(0), c, data, out_dir=tmp_path, show_progress=False)
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(t, "evaluate", lambda: {"eval_loss": next(losses), "eval_ce": 0.0, "eval_kl": 0.0,
                                                "eval_ppl": 1.0, "eval_tokens": 1})
    out = t.train()
    assert not out["early_stopped"] and out["steps"] == 5 and out["best_step"] == 1


# ---------------------------------------------------------------- KD plumbing with a fake store


class FakeTeacherBatch:
    codec = DenseBF16Codec()  # a dense codec: the trainer reads it through logits()

    def __init__(self, logits_NV: torch.Tensor):
        self.logits_NV = logits_NV

    @property
    def num_positions(self) -> int:
        return self.logits_NV.shape[0]

    def to(self, device):
        return FakeTeacherBatch(self.logits_NV.to(device))

    def logits(self, start, end):
        return self.logits_NV[start:end]


class FakeStore:
    """Dense teacher logits (N, L, Vt) per split; records which sequences were read."""

    codec = DenseBF16Codec()

    def __init__(self, logits: dict[str, torch.Tensor]):
        self.logits, self.reads = logits, []

    def teacher_batch(self, split, indices):
        self.reads.append((split, list(indices)))
        return FakeTeacherBatch(self.logits[split][list(indices)].flatten(0, 1))


def test_kd_eval_loss_equals_an_explicit_loop_with_padded_teacher_vocab(tmp_path):
    """Teacher logits padded to V+8 with huge garbage: sliced to the shared vocab V; the eval loss is the sum
    over every eval token of alpha*CE + (1-alpha)*T^2*KL divided by the token count, across micro-batches."""
    data = tiny_data(8, n_val=5)
    g = torch.Generator().manual_seed(1)
    store = FakeStore({s: torch.randn(len(a), L, V + 8, generator=g) * 3 for s, a in data.items()})
    for t in store.logits.values():
        t[..., V:] = 50.0
    c = cfg(alpha=0.3, temperature=2.0, batch_size=2, gradient_accumulation_steps=1, max_steps=1,
            loss_chunk_size=7)
    model = tiny_model(0)
    tr = DistillTrainer(model, c, data, store=store, vocab_size=V, out_dir=tmp_path, show_progress=False)
    got = tr.evaluate()
    assert {s for s, _ in store.reads} == {"validation"}
    total = ce_tot = kl_tot = 0.0
    count = 0
    with torch.no_grad():
        for i in range(5):
            ids = torch.from_numpy(data["validation"][i:i + 1]).long()
            z = model(input_ids=ids).logits[0].double()
            t = store.logits["validation"][i].double()[:, :V]
            for pos in range(L - 1):
                y = int(ids[0, pos + 1])
                ce = -torch.log_softmax(z[pos], -1)[y]
                p, logq = torch.softmax(t[pos] / 2, -1), torch.log_softmax(z[pos] / 2, -1)
                kl = (p * (p.log() - logq)).sum()
                total += float(0.3 * ce + 0.7 * 4 * kl)
                ce_tot, kl_tot, count = ce_tot + float(ce), kl_tot + float(kl), count + 1
    assert got["eval_tokens"] == count == 5 * (L - 1)
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_kl"] == pytest.approx(kl_tot / count, rel=1e-5)
    assert got["eval_ppl"] == pytest.approx(math.exp(ce_tot / count), rel=1e-5)
    # a KD step reads exactly the step's sequences from the store, and moves the weights
    before = params_of(model)
    tr.train()
    assert sorted(i for s, idx in store.reads if s == "train" for i in idx) == sorted(tr.step_indices(0))
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())


def test_kd_needs_a_store():
    with pytest.raises(ValueError, match="alpha=0.5 < 1 needs the teacher-logit store"):
        DistillTrainer(tiny_model(0), cfg(alpha=0.5), tiny_data(8), out_dir="unused")


def test_empty_validation_split_is_an_error(tmp_path):
    data = tiny_data(8)
    data["validation"] = data["validation"][:0]
    with pytest.raises(ValueError, match="validation split holds no sequences"):
        DistillTrainer(tiny_model(0), cfg(), data, out_dir=tmp_path)


def test_lr_schedule_warmup_then_cosine_to_a_tenth(tmp_path):
    t = DistillTrainer(tiny_model(0), cfg(warmup_steps=3, max_steps=10), tiny_data(8), out_dir=tmp_path)
    lrs = []
    for _ in range(10):
        lrs.append(t.scheduler.get_last_lr()[0] / 3e-3)
        t.optimizer.step()
        t.scheduler.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_bf16_compute_keeps_fp32_weights_close_to_fp32_training(tmp_path):
    """train.dtype=bfloat16: FSDP2 mixed precision on 2 ranks, autocast in one process; master weights stay fp32."""
    data = tiny_data(16)
    c = dict(num_epochs=1.0, gradient_accumulation_steps=2)
    w_fsdp = run_ranks(tmp_path / "r2", cfg(batch_size=2, dtype="bfloat16", **c), data, param_dtype=torch.bfloat16)
    _, w_auto = train(tmp_path / "r1", data, cfg(batch_size=4, dtype="bfloat16", **c))
    _, w_fp32 = train(tmp_path / "f", data, cfg(batch_size=4, **c))
    for w in (w_fsdp, w_auto):
        assert all(v.dtype == torch.float32 for v in w.values())
        assert_same_weights(w, w_fp32, atol=3e-2)  # 2 steps of lr 3e-3: bf16 noise stays far below that
        with pytest.raises(AssertionError):  # ...but bf16 really was used
            assert_same_weights(w, w_fp32)
