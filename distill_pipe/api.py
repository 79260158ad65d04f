"""The store from your own training loop: open it with its lineage checked, iterate a split, compute the loss.

    store = open_store("stages/teacher_logits/logits.zarr", tokens="stages/prepare/tokens.zarr")
    loss_fn = DistillLoss(store, student, tokenizer, alpha=0.5, temperature=2.0)
    loader = DataLoader(StoreDataset(store, "train"), batch_size=4, sampler=EpochSampler(store, seed=0),
                        collate_fn=Collate(store))
    metrics = loss_fn.backward(student, [next(it) for _ in range(accumulation)])   # one optimizer step's grads

Everything that makes the result exact is here, not left to the caller: the temperature and divergence checks
against the store's codec and the lineage checks (the tokenizer the store was made with, the tokens.zarr it was
made from) run when a store and a loss are made; `DistillLoss.backward` counts the target tokens of the whole
optimizer step (all micro-batches; all ranks when torch.distributed is initialised) before the first backward
and divides every micro-batch's loss SUM by that count, once. The loss is `losses.model_loss` with the teacher
function of `trainer.teacher_targets_fn`, the same code the `train` stage runs; `EpochSampler`, `make_optimizer`
and `make_scheduler` give the stage's data order, optimizer and schedule, so a loop built from them reproduces a
`distill-pipe train` run bit for bit (docs/examples/, tests/test_api.py).

Shapes: B sequences per micro-batch, L sequence length.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distill_pipe import distributed as dd
from distill_pipe.config import ConfigError, TrainConfig
from distill_pipe.losses import IGNORE_INDEX, LossSums, count_targets, model_loss
from distill_pipe.store import LogitStore, TeacherBatch
from distill_pipe.batches import epoch_order, next_token_targets, read_rows
from distill_pipe.trainer import (_no_teacher, check_store_divergence, check_store_temperature, lr_lambda,
                                  make_optimizer, teacher_targets_fn)

__all__ = ["Collate", "DistillLoss", "EpochSampler", "StoreDataset", "global_token_count", "make_optimizer",
           "make_scheduler", "open_store"]

SPLITS = ("train", "validation")


def open_store(path_or_url, *, tokens=None, storage_options: dict | None = None) -> LogitStore:
    """The teacher-logit store at a local path or fsspec URL, its train and validation splits checked complete.

    tokens: the tokens.zarr (path) you mean to pair with the store, e.g. to train CE-only students from it:
    refused unless the store was made from exactly those tokens (its validation split would otherwise overlap
    what you train on). Errors are one line naming the fix (StoreError, TrainError, DataError).
    """
    from distill_pipe.store import StoreError
    from distill_pipe.store import open_store as open_raw

    store = open_raw(path_or_url, storage_options=storage_options)
    for split in SPLITS:
        if split not in store.splits:
            raise StoreError(f"store {path_or_url} has no {split} split; rerun `distill-pipe teacher-logits`")
        store.check_complete(split)  # StoreIncompleteError naming the missing shards and the rerun
    if tokens is not None:
        from distill_pipe.data import open_tokens
        from distill_pipe.train import check_store_made_from

        check_store_made_from(store, tokens, open_tokens(tokens).attrs["fingerprint"])
    return store


class StoreDataset(torch.utils.data.Dataset):
    """The sequences of one split of a store, as next-token training rows.

    Item i: {"split", "index": i, "input_ids": (L,) int64, "labels": (L,) int64, "shift_labels": (L,) int64}.
    shift_labels[t] is the target of position t (the next token; IGNORE_INDEX at the last position and, for a
    store of conversations, wherever the next token is not an assistant's); labels is the same in Hugging Face's
    unshifted convention (labels[t + 1] == shift_labels[t], IGNORE_INDEX at 0), so HF counts the same tokens.
    A batch of items is read in one go (`__getitems__`, which DataLoader uses).
    max_sequences: the first that many sequences only (the train stage's max_eval_sequences).
    """

    def __init__(self, store: LogitStore, split: str, *, max_sequences: int | None = None):
        if split not in store.splits:
            raise ConfigError(f"store {store.location} has no {split!r} split; choose one of {', '.join(store.splits)}")
        self.store, self.split = store, split
        self.input_ids = store.token_rows(split)
        self.target_mask = store.token_rows(split, mask=True)  # None for plain text
        n = store.num_sequences(split)
        self.num_sequences = n if max_sequences is None else min(n, max_sequences)
        if self.num_sequences == 0:
            raise ConfigError(f"the {split} split of {store.location} holds no sequences; rerun `distill-pipe "
                              "prepare` with more data (or a larger data.validation_fraction)")

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.num_sequences for i in indices):
            raise IndexError(f"sequence indices {indices} outside [0, {self.num_sequences}) of {self.split}")
        ids_BL = torch.from_numpy(read_rows(self.input_ids, indices).astype(np.int64))
        mask = None if self.target_mask is None else read_rows(self.target_mask, indices)
        targets_BL = next_token_targets(ids_BL, mask)
        labels_BL = torch.full_like(targets_BL, IGNORE_INDEX)
        labels_BL[:, 1:] = targets_BL[:, :-1]
        return [{"split": self.split, "index": i, "input_ids": ids_BL[k], "labels": labels_BL[k], "shift_labels": targets_BL[k]}
                for k, i in enumerate(indices)]


class Collate:
    """DataLoader collate_fn: StoreDataset items (of one split, any) -> one micro-batch with its teacher payload.

    Returns {"split", "indices" (B,) int64, "input_ids", "labels", "shift_labels" (B, L) int64, "teacher"}:
    "teacher" is the compact payload `store.teacher_batch(split, indices)` on the CPU (pinned with pin_memory,
    for an asynchronous copy to the GPU), read here so a DataLoader's workers read it ahead of the compute;
    None with teacher=False (CE-only training, alpha 1: nothing is read).
    """

    def __init__(self, store: LogitStore, *, teacher: bool = True, pin_memory: bool = False):
        self.store, self.teacher, self.pin_memory = store, teacher, pin_memory

    def __call__(self, items: list[dict]) -> dict:
        if not items or "index" not in items[0] or "split" not in items[0]:
            raise ConfigError("Collate needs StoreDataset items with their 'split' and 'index'; under Hugging Face's "
                              "Trainer pass remove_unused_columns=False in TrainingArguments")
        split = items[0]["split"]
        if any(it["split"] != split for it in items):
            raise ConfigError("Collate: one micro-batch mixes sequences of several splits; give each split its own "
                              "DataLoader")
        indices = [int(it["index"]) for it in items]
        batch = {"split": split, "indices": torch.tensor(indices, dtype=torch.int64),
                 **{k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "shift_labels")}}
        batch["teacher"] = (self.store.teacher_batch(split, indices, pin_memory=self.pin_memory)
                            if self.teacher else None)
        return batch


class EpochSampler(torch.utils.data.Sampler):
    """The train stage's data order: epoch e visits the split in the permutation seeded by (seed, e), the global
    batch of step s being its next batch_size * accumulation * world sequences; call `set_epoch(e)` before each
    epoch (Hugging Face's Trainer does). With batch_size and world_size > 1, rank r gets the micro-batches
    r, r + world, ... of each epoch's order (micro-batch k = order[k*b:(k+1)*b]), as the stage does; leave
    world_size 1 where the framework shards batches itself (Hugging Face's Trainer, accelerate)."""

    def __init__(self, store_or_len, seed: int, *, batch_size: int = 1, rank: int = 0, world_size: int = 1):
        self.num_sequences = (store_or_len if isinstance(store_or_len, int)
                              else store_or_len.num_sequences("train") if isinstance(store_or_len, LogitStore)
                              else len(store_or_len))
        if not 0 <= rank < world_size:
            raise ConfigError(f"EpochSampler: rank {rank} outside world_size {world_size}")
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> np.ndarray:
        order = epoch_order(self.seed, self.epoch, self.num_sequences)
        if self.world_size == 1:
            return order
        b = self.batch_size
        return np.concatenate([order[k:k + b] for k in range(self.rank * b, len(order), b * self.world_size)]
                              or [order[:0]])

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine().tolist())

    def __len__(self) -> int:
        return len(self._mine())


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """The train stage's schedule: linear warmup, then cosine decay to a tenth of the peak at the last step.
    Step it after every optimizer step. total_steps: train.max_steps, or ceil(num_epochs * steps per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))


def global_token_count(batches: Sequence[dict]) -> int:
    """Target tokens of one optimizer step: every micro-batch of it, summed over the ranks when torch.distributed
    is initialised. Count before the first backward and divide every micro-batch's loss sum by it."""
    local = sum(count_targets(b["shift_labels"]) for b in batches)
    return int(dd.all_reduce(local, "sum"))


class DistillLoss:
    """alpha * CE + (1 - alpha) * T^2 * divergence(teacher_T, student_T) of a student on micro-batches of a store.

    Checks, when made, what would make the result wrong: alpha, temperature, divergence and beta (the params keys
    of the same names, docs/params.md), the temperature and divergence against the store's codec (a sampled
    store holds the teacher at its own temperature only, dense-u8 at T <= 1 only), and the student's tokenizer
    against the one the store was made with. The vocabulary compared is the student's (== the teacher's), or
    the tokenizer's when either model pads its vocabulary beyond it.

    grad_reduction: how the gradients are reduced over ranks: "mean" (DDP, FSDP and Hugging Face's defaults:
    each rank's loss is multiplied by the world size to undo the mean) or "sum" (the train stage's FSDP).
    """

    def __init__(self, store: LogitStore | None, model: nn.Module, tokenizer, *, alpha: float, temperature: float,
                 divergence: str = "forward_kl", beta: float = 0.5, chunk_size: int | None = None,
                 grad_reduction: str = "mean"):
        cfg = TrainConfig(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                          loss_chunk_size=chunk_size)
        cfg.validate("DistillLoss")
        if grad_reduction not in ("mean", "sum"):
            raise ConfigError(f"DistillLoss.grad_reduction must be mean or sum, got {grad_reduction!r}")
        if alpha < 1 and store is None:
            raise ConfigError(f"DistillLoss: alpha={alpha} < 1 needs the teacher-logit store; pass open_store(...) "
                              "or set alpha=1")
        check_store_temperature(store, cfg)
        check_store_divergence(store, cfg)
        self.store, self.cfg, self.grad_reduction = store, cfg, grad_reduction
        self.vocab_size = _compared_vocab(store, model, tokenizer)
        self._heads: dict[torch.device, object] = {}

    # ------------------------------------------------------------------ one micro-batch

    def __call__(self, model: nn.Module, batch: dict, *, grad_scale: float | None = None) -> LossSums:
        """Loss SUMS of one micro-batch (a Collate output) and its counted tokens; never divided by a count.
        grad_scale: losses.head_loss's (a promise to backpropagate loss * grad_scale exactly once; only where no
        hook reduces gradients, e.g. not under DDP); `backward` passes it in a single process."""
        device = _device_of(model)
        ids_BL = batch["input_ids"].to(device)
        targets_BL = batch["shift_labels"].to(device)
        cfg, teacher_fn = self.cfg, None
        if cfg.alpha < 1 and count_targets(targets_BL) == 0:  # nothing counted: no position reads the teacher
            teacher_fn = _no_teacher
        elif cfg.alpha < 1:
            tb = batch.get("teacher")
            if tb is None:  # collated with teacher=False: read it here
                tb = self.store.teacher_batch(batch["split"], batch["indices"].tolist())
            teacher_fn = teacher_targets_fn(self._on_device(tb, device), cfg.temperature, self.vocab_size)
        return model_loss(model, ids_BL, targets_BL, teacher_fn, vocab_size=self.vocab_size, alpha=cfg.alpha,
                          temperature=cfg.temperature, chunk_size=cfg.loss_chunk_size, divergence=cfg.divergence,
                          beta=cfg.beta, grad_scale=grad_scale)

    def normalise(self, loss_sum: torch.Tensor, step_tokens) -> torch.Tensor:
        """A micro-batch's loss to backpropagate: its sum over the step's GLOBAL token count (global_token_count,
        or Hugging Face's num_items_in_batch), times the world size where gradients are averaged over ranks."""
        loss = loss_sum / max(int(step_tokens), 1)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return loss * world if self.grad_reduction == "mean" and world > 1 else loss

    # ------------------------------------------------------------------ one optimizer step

    def backward(self, model: nn.Module, batches: Sequence[dict]) -> dict:
        """Gradients of one optimizer step over this rank's micro-batches: exactly the mean over the step's target
        tokens, however the step is split into micro-batches and ranks (then clip, step the optimizer and the
        schedule, zero the gradients, as the train stage does). Under DDP the gradients are reduced once, after the last micro-batch. Returns the step's means over
        tokens, {"loss", "ce", "kl", "tokens"} (kl: the divergence, without T^2), the same on every rank."""
        step_tokens = global_token_count(batches)  # before the first backward
        device = _device_of(model)
        acc = torch.zeros(3, dtype=torch.float64, device=device)
        # One process, no DDP wrapper: the loss may add the head's gradient into .grad itself (as the train stage
        # does); under DDP, whose reduction hooks on gradient accumulation, autograd must hand it over.
        alone = not dist.is_initialized() and not hasattr(model, "no_sync")
        scale = self.normalise(torch.ones(()), step_tokens).item() if alone else None
        for m, batch in enumerate(batches):
            last = m == len(batches) - 1
            sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
            with sync:
                sums = self(model, batch, grad_scale=scale)
                self.normalise(sums.loss, step_tokens).backward()
            acc += torch.stack([sums.loss.detach(), sums.ce, sums.kl]).to(torch.float64)
            del sums
        loss, ce, kl = (dd.all_reduce(v, "sum") / max(step_tokens, 1) for v in acc.tolist())
        return {"loss": loss, "ce": ce, "kl": kl, "tokens": step_tokens}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict:
        """Means over every target token of `batches` (e.g. a DataLoader over StoreDataset(store, "validation")),
        summed over the ranks: what the train stage logs as eval_loss, eval_ce, eval_kl, eval_ppl, eval_tokens."""
        was_training = model.training
        model.eval()
        loss = ce = kl = 0.0
        count = 0
        for batch in batches:
            sums = self(model, batch)
            loss, ce, kl = loss + sums.loss.item(), ce + sums.ce.item(), kl + sums.kl.item()
            count += sums.num_tokens
        model.train(was_training)
        loss, ce, kl, count = (dd.all_reduce(v, "sum") for v in (loss, ce, kl, count))
        count = max(int(count), 1)
        return {"eval_loss": loss / count, "eval_ce": ce / count, "eval_kl": kl / count,
                "eval_ppl": math.exp(min(ce / count, 700.0)), "eval_tokens": count}

    def hf_loss(self, model: nn.Module, inputs: dict, num_items_in_batch, args) -> torch.Tensor:
        """compute_loss of a Hugging Face Trainer subclass (docs/examples/hf_trainer.py): the micro-batch's sum over
        the step's token count that the Trainer counted over all accumulation micro-batches (from "labels",
        counted like shift_labels) and, with average_tokens_across_devices, over all ranks. Set the subclass's
        `loss_is_scaled_for_ga = True` and `model_accepts_loss_kwargs = True` (so it counts and does not divide
        by the accumulation steps again)."""
        if num_items_in_batch is None:
            raise ConfigError("the Trainer passed no num_items_in_batch: set model_accepts_loss_kwargs = True on the "
                              "Trainer subclass and keep the 'labels' of Collate in the batch")
        if args.world_size > 1 and not args.average_tokens_across_devices:
            raise ConfigError("average_tokens_across_devices=False counts each rank's tokens only; set it True so "
                              "the loss is divided by the step's global token count")
        sums = self(model, inputs)
        loss = sums.loss / max(int(num_items_in_batch), 1)
        return loss * args.world_size if args.world_size > 1 else loss

    def _on_device(self, tb: TeacherBatch, device: torch.device) -> TeacherBatch:
        """The payload on the model's device; a factored store's head goes there once, not with every batch."""
        if device not in self._heads:
            self._heads[device] = self.store.head_on(device)
        head = self._heads[device]
        pinned = device.type == "cuda" and all(v.is_pinned() for v in tb.payload.values())
        if head is None and not pinned:
            return tb.to(device)
        return tb.to(device, non_blocking=pinned, head=head)


def _compared_vocab(store: LogitStore | None, model: nn.Module, tokenizer) -> int:
    """train's vocabulary rule and tokenizer lineage check (TrainError naming the fix)."""
    from distill_pipe.train import _check_vocab

    if store is None:  # CE only: nothing to compare with; the student's own head
        return int(model.get_output_embeddings().weight.shape[0])
    source = {"tokenizer": store.info["tokenizer"], "path": store.location, "teacher_vocab": int(store.vocab_size)}
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return _check_vocab(model, tokenizer, source, name)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


