"""Trainer: exact gradient accumulation, FSDP2 sync control, eval, early stopping.

Shapes: B sequences per micro-batch, L sequence length, N = B*L flattened positions, V vocabulary.

One optimizer step takes the next GLOBAL batch of G = batch_size * gradient_accumulation_steps * world
sequences from a per-epoch seeded permutation (so the data order depends on the seed and G only) and
splits it into per-rank micro-batches. Before the first backward the step's target tokens are counted
over all micro-batches and ranks; each micro-batch backpropagates loss_sum / global_count, and gradient
reduction across ranks SUMS (FSDP's default divide-by-world is turned off). So the step's gradient is
exactly the mean over the step's tokens, however the global batch is split (DESIGN.md: trl#4719,
transformers#37766). Evaluation uses the same normalisation: sum over all eval tokens / all eval tokens.

Checkpoints (every save_steps; checkpoint.py) hold model, optimizer, RNG states and `state_dict()`: step (which
fixes the data position), scheduler, early-stopping state; the history (metrics.py) travels with them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill_pipe import distributed as dd
from distill_pipe.batches import Batch, BatchSource
from distill_pipe.checkpoint import CheckpointError, Checkpointer  # noqa: F401 - CheckpointError re-exported
from distill_pipe.config import ConfigError, TrainConfig
from distill_pipe.distributed import DistInfo, fsdp_modules
from distill_pipe.losses import LossSums, SparseTargets, model_loss
from distill_pipe.metrics import History
from distill_pipe.prefetch import MicroBatchPlan, PendingBatch
from distill_pipe.student_head import check_linear_head, head_spec

log = logging.getLogger(__name__)

@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations without an improvement larger than `min_delta`."""

    patience: int | None
    min_delta: float
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False

    def update(self, loss: float, step: int) -> bool:
        """Record an eval loss; True when it is a new best."""
        if loss < self.best_loss - self.min_delta or (self.best_loss == math.inf and math.isfinite(loss)):
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience:
            self.stopped = True
        return False

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "stopped": self.stopped}

    def load(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.bad_evals, self.stopped = state["bad_evals"], state["stopped"]


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR: linear warmup, then cosine decay to 0.1 at the last step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying only matrices (dim >= 2): the trainer's optimizer."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


class Trainer(BatchSource):
    """Training loop over whole sequences; subclasses implement `compute_loss`.

    data: {"train": (N, L) int array, "validation": (M, L) int array} (numpy or zarr), the token ids.
    out_dir: where `checkpoints/` go. metrics_dir: where the live metrics go (metrics.py; default
    out_dir/dvclive). fingerprint: what made this run (checked on resume).
    on_best(trainer): called on every rank when the eval loss improves (e.g. to export the model).
    on_checkpoint(trainer): called on every rank after each checkpoint is complete.
    target_masks: {split: (N, L) uint8 array} for conversations: predicting token t counts only where
    target_masks[split][n, t] is 1 (in every term and every count); None: every next token counts.
    """

    _grad_scale: float | None = None
    """1 / the step's global token count while train_step backpropagates (compute_loss hands it to the loss)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: dict, *, out_dir: str | Path,
                 info: DistInfo | None = None, fingerprint: dict | None = None,
                 on_best: Callable[[Trainer], None] | None = None,
                 on_checkpoint: Callable[[Trainer], None] | None = None, show_progress: bool = True,
                 target_masks: dict | None = None, metrics_dir: str | Path | None = None):
        self.model, self.cfg, self.data = model, cfg, data
        self.target_masks = target_masks or {}
        self.info = info or DistInfo(0, 1, 0, torch.device("cpu"))
        self.device = self.info.device
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint or {}
        self.history = History(Path(metrics_dir) if metrics_dir else self.out_dir / "dvclive", self.info.is_main)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.info, self.fingerprint,
                                         carry={"dvclive": self.history.folder})
        self.on_best = on_best
        self.on_checkpoint = on_checkpoint
        self.show_progress = show_progress
        self.fsdp = bool(fsdp_modules(model))
        if self.fsdp:
            # The loss is already divided by the global token count: reduce gradients as a SUM over ranks,
            # not FSDP's default mean (which would divide by the world size a second time).
            for m in fsdp_modules(model):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        self.num_train = int(data["train"].shape[0])
        if self.num_train == 0:
            raise ValueError("the training split holds no sequences; rerun `distill-pipe prepare` with more data")
        n_eval = int(data["validation"].shape[0]) if "validation" in data else 0
        if cfg.max_eval_sequences is not None:
            n_eval = min(n_eval, cfg.max_eval_sequences)
        if n_eval == 0:
            raise ValueError("the validation split holds no sequences; raise data.validation_fraction and rerun "
                             "`distill-pipe prepare`")
        self.num_eval = n_eval
        self.global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self.info.world_size
        self.steps_per_epoch = math.ceil(self.num_train / self.global_batch)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.steps_per_epoch))
        self.optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, self.total_steps))
        self.early = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.last_eval: dict | None = None
        self.best_eval: dict | None = None
        self._autocast = (not self.fsdp and cfg.dtype == "bfloat16")
        self._pin = self.device.type == "cuda"  # pinned host rows copy to the GPU asynchronously
        self.data_wait_seconds = 0.0  # training-thread time spent waiting on token rows and teacher payloads
        self.inline_read_seconds = 0.0  # time compute_loss spent reading the store itself (nothing read ahead)

    # ------------------------------------------------------------------ to implement

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossSums:
        """Loss SUMS of one micro-batch (never divided by a count: the trainer normalises)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps

    def _forward_loss(self, batch: Batch) -> LossSums:
        if self._autocast:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.compute_loss(self.model, batch)
        return self.compute_loss(self.model, batch)

    def train_step(self, batches: list[Batch | PendingBatch]) -> dict:
        """One optimizer step over this rank's micro-batches (read or read-ahead); returns step metrics (means
        over tokens)."""
        self.model.train()
        local = sum(b.num_tokens for b in batches)
        global_count = int(dd.all_reduce(local, "sum", self.device))  # before the first backward
        denom = max(global_count, 1)
        # float64 on the device: the same sums as adding Python floats, without a sync per micro-batch
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        # The loss adds the head's gradient into .grad already divided by denom (losses.head_loss grad_scale):
        # no fp32 (V, d) buffer beside .grad. Nothing here reduces gradients from hooks (FSDP2 reads .grad).
        self._grad_scale = 1.0 / denom
        try:
            for m, batch in enumerate(batches):
                batch = self.materialize(batch)
                if self.fsdp:  # reduce gradients across ranks once, after the last micro-batch
                    self.model.set_requires_gradient_sync(m == len(batches) - 1)
                sums = self._forward_loss(batch)
                (sums.loss / denom).backward()
                assert sums.num_tokens == batch.num_tokens, "compute_loss counted other tokens than make_targets"
                acc += torch.stack([sums.loss.detach(), sums.ce, sums.kl]).to(torch.float64)
                del batch, sums  # the next read-ahead payload may take this one's memory
        finally:
            self._grad_scale = None
        loss_sum, ce_sum, kl_sum = acc.tolist()
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = [dd.all_reduce(v, "sum", self.device) for v in (loss_sum, ce_sum, kl_sum)]
        self.tokens_seen += global_count
        return {"loss": sums[0] / denom, "ce": sums[1] / denom, "kl": sums[2] / denom, "lr": lr,
                "grad_norm": grad_norm, "tokens": global_count}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> LossSums:
        self.model.eval()
        return self._forward_loss(batch)

    def evaluate(self) -> dict:
        """Loss over the validation split (first max_eval_sequences): sum over all tokens / all tokens."""
        indices = list(range(self.num_eval))
        per_round = self.cfg.batch_size * self.info.world_size
        loss = ce = kl = 0.0
        count = 0
        rounds = [("validation", indices[start:start + per_round], 1) for start in range(0, len(indices), per_round)]
        stream = self.open_stream(iter(rounds))
        try:
            for split, idx, micro in rounds:
                batches = stream.next_step() if stream else self.micro_batches(split, idx, micro_steps=micro)
                for batch in batches:
                    sums = self.eval_step(self.materialize(batch))
                    loss, ce, kl = loss + sums.loss.item(), ce + sums.ce.item(), kl + sums.kl.item()
                    count += sums.num_tokens
        finally:
            if stream is not None:
                stream.close()
        loss, ce, kl, count = (dd.all_reduce(v, "sum", self.device) for v in (loss, ce, kl, count))
        count = max(int(count), 1)
        ce_mean = ce / count
        return {"eval_loss": loss / count, "eval_ce": ce_mean, "eval_kl": kl / count,
                "eval_ppl": math.exp(min(ce_mean, 700.0)), "eval_tokens": count}

    # ------------------------------------------------------------------ loop

    def train(self, until_step: int | None = None) -> dict:
        """Train to total_steps (or `until_step`, to simulate an interruption), evaluating every eval_steps,
        checkpointing every save_steps, stopping early when the eval loss stops improving."""
        cfg, end = self.cfg, min(self.total_steps, until_step or self.total_steps)
        bar = None
        if self.show_progress and self.info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.history.open(resume=self.step > 0)  # after a resume: the history the checkpoint carried, continued
        # The same steps the loop below takes, planned ahead so their reads overlap the compute.
        stream = self.open_stream(("train", self.step_indices(s), None) for s in range(self.step, end))
        try:
            while self.step < end and not self.early.stopped:
                t0 = time.perf_counter()
                # Data wait of this step: growth of the stream's wait and of the inline store reads, plus (no
                # stream) the inline read of the token rows.
                wait_before = (stream.timer.wait_s if stream else 0.0) + self.inline_read_seconds
                batches = stream.next_step() if stream else self.micro_batches("train", self.step_indices(self.step))
                if not stream:
                    wait_before -= time.perf_counter() - t0  # reading the token rows inline
                metrics = self.train_step(batches)
                seconds = time.perf_counter() - t0
                self.train_seconds += seconds
                self.data_wait_seconds += ((stream.timer.wait_s if stream else 0.0) + self.inline_read_seconds
                                           - wait_before)
                self.step += 1
                metrics = {"step": self.step, **metrics, "tokens_per_s": metrics["tokens"] / max(seconds, 1e-9)}
                self.history.log_train(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    refresh=False)
                if self.step % cfg.eval_steps == 0 or self.step == self.total_steps:
                    self._eval_and_track()
                if self.step % cfg.save_steps == 0 or self.step == self.total_steps or self.early.stopped:
                    self.save_checkpoint()
        finally:
            if stream is not None:
                stream.close()
            if bar is not None:
                bar.close()
        if self.finished:
            self.history.close()
        if self.early.stopped and self.info.is_main:
            log.info("early stop at step %d: no eval improvement > %g in %d evaluations (best %.4f at step %d)",
                     self.step, cfg.early_stop_min_delta, self.early.bad_evals, self.early.best_loss,
                     self.early.best_step)
        return self.summary()

    def _eval_and_track(self) -> None:
        ev = self.evaluate()
        self.last_eval = {"step": self.step, **ev}
        improved = self.early.update(ev["eval_loss"], self.step)
        if improved:
            self.best_eval = self.last_eval
        self.history.log_eval(self.last_eval, self.best_eval)
        if self.info.is_main:
            log.info("step %d: eval loss %.4f, ppl %.2f%s", self.step, ev["eval_loss"], ev["eval_ppl"],
                     " (best)" if improved else "")
        if improved and self.on_best is not None:
            self.on_best(self)

    @property
    def finished(self) -> bool:
        """Nothing left to train: the last step was taken, or early stopping stopped the run."""
        return self.step >= self.total_steps or self.early.stopped

    def summary(self) -> dict:
        return {"steps": self.step, "total_steps": self.total_steps, "tokens": self.tokens_seen,
                "train_seconds": self.train_seconds, "data_wait_seconds": self.data_wait_seconds,
                "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds else None,
                "early_stopped": self.early.stopped, "best_eval_loss": self.early.best_loss,
                "best_step": self.early.best_step, "best_eval": self.best_eval, "final_eval": self.last_eval}

    # ------------------------------------------------------------------ checkpoints (checkpoint.py)

    def state_dict(self) -> dict:
        """The trainer's own state a checkpoint carries beside model, optimizer and RNG."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "data_wait_seconds": self.data_wait_seconds, "scheduler": self.scheduler.state_dict(), "early_stopping": self.early.state(),
                "last_eval": self.last_eval, "best_eval": self.best_eval, "world_size": self.info.world_size,
                "global_batch": self.global_batch, "total_steps": self.total_steps,
                "data_position": {"epoch": self.step // self.steps_per_epoch,
                                  "step_in_epoch": self.step % self.steps_per_epoch}}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.early.load(state["early_stopping"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_seconds, self.data_wait_seconds = state["train_seconds"], state["data_wait_seconds"]
        self.last_eval, self.best_eval = state["last_eval"], state["best_eval"]

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.state_dict(),
                                      best_step=self.best_eval["step"] if self.best_eval else None,
                                      keep_last=self.cfg.keep_last)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; refuse a checkpoint from another config."""
        self.load_state_dict(self.checkpointer.load(path, self.model, self.optimizer, is_finished=_finished))
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def checkpoints(self) -> list[Path]:
        return self.checkpointer.checkpoints()

    def latest_checkpoint(self) -> Path | None:
        return self.checkpointer.latest()

    def clean_stale_temp(self) -> None:
        self.checkpointer.clean_stale_temp()


def _finished(state: dict) -> bool:
    """Trainer.finished of a checkpoint's state."""
    return state["step"] >= state["total_steps"] or state["early_stopping"]["stopped"]


class DistillTrainer(Trainer):
    """Hybrid KD loss (alpha*CE + (1-alpha)*T^2*KL, sums) with teacher logits read from the store.

    vocab_size: the number of logits compared (the shared vocabulary): the student's logits and the
    teacher's are sliced to it when either is padded beyond it. store: the logit store (None iff alpha == 1).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: dict, *, store=None, vocab_size: int | None = None,
                 **kwargs):
        if cfg.alpha < 1 and store is None:
            raise ConfigError(f"train.alpha={cfg.alpha} < 1 needs the teacher-logit store; run "
                              "`distill-pipe teacher-logits` or set alpha: 1")
        check_store_temperature(store, cfg)
        check_store_divergence(store, cfg)
        super().__init__(model, cfg, data, **kwargs)
        self.store = store
        self.vocab_size = head_spec(model, vocab_size).vocab_size  # None: the student's head rows
        # The loss forms the logits from the last hidden state and the head (student_head.py): refuse a student
        # whose logits are something else now, before a step is taken or anything is written.
        check_linear_head(model, self.make_batch("train", [0]).input_ids_BL, self.vocab_size)
        # The factored head (a fitted transform folded in) goes to the device once per run, not per micro-batch.
        self._head = store.head_on(self.device) if hasattr(store, "head_on") else None

    def read_teacher(self, plan: MicroBatchPlan):
        """Runs in a read-ahead thread: the compact payload on the CPU, pinned when CUDA is available."""
        if self._pin:
            return self.store.teacher_batch(plan.split, list(plan.indices), pin_memory=True)
        return self.store.teacher_batch(plan.split, list(plan.indices))

    def teacher_loader(self):
        return self.read_teacher if self.cfg.alpha < 1 else None

    def teacher_to_device(self, tb):
        if self._head is None and not self._pin:
            return tb.to(self.device)
        return tb.to(self.device, non_blocking=self._pin, head=self._head)

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossSums:
        teacher_fn = None
        if self.cfg.alpha < 1 and batch.num_tokens == 0:  # a padding batch: no position reads the teacher
            teacher_fn = _no_teacher
        elif self.cfg.alpha < 1:
            tb = batch.teacher
            if tb is None:  # nothing read ahead (train.prefetch 0): read here, and count the wait
                t0 = time.perf_counter()
                tb = self.teacher_to_device(self.store.teacher_batch(batch.split, batch.indices))
                self.inline_read_seconds += time.perf_counter() - t0
            teacher_fn = teacher_targets_fn(tb, self.cfg.temperature, self.vocab_size)
        return model_loss(model, batch.input_ids_BL, batch.targets_BL, teacher_fn, vocab_size=self.vocab_size,
                          alpha=self.cfg.alpha, temperature=self.cfg.temperature,
                          chunk_size=self.cfg.loss_chunk_size, divergence=self.cfg.divergence, beta=self.cfg.beta,
                          grad_scale=self._grad_scale if self._declares_grad_scale() else None)

    def _declares_grad_scale(self) -> bool:
        """Whether the loss may take the step's factor (losses.head_loss grad_scale): only for this class's own
        compute_loss, whose loss train_step backpropagates as it is. A subclass that overrides compute_loss may
        rescale, detach or replace the loss, so its head's gradient goes through autograd."""
        return torch.is_grad_enabled() and type(self).compute_loss is DistillTrainer.compute_loss


def teacher_targets_fn(tb, temperature: float, vocab_size: int | None):
    """The loss's teacher function over one micro-batch's teacher payload (store.teacher_batch, on the device):
    (start, end) -> (C, V) logits sliced to the compared vocabulary, or SparseTargets for sparse codecs."""

    def teacher_fn(start: int, end: int) -> torch.Tensor | SparseTargets:
        if tb.codec.sparse:  # a few ids per position, gathered from the student's log-probs: no (N, V)
            t = tb.sparse_targets(start, end, temperature)
            return t if vocab_size is None else t.within_vocab(vocab_size)
        logits = tb.logits(start, end)
        return logits if vocab_size is None else logits[:, :vocab_size]

    return teacher_fn


def check_store_temperature(store, cfg: TrainConfig) -> None:
    """ConfigError when KD at cfg.temperature would read targets the store does not hold (e.g. a sampled store
    drawn at another temperature); CE-only training (alpha == 1) never reads the store."""
    problem = store.codec.check_temperature(cfg.temperature) if store is not None and cfg.alpha < 1 else None
    if problem:
        raise ConfigError(problem)


def check_store_divergence(store, cfg: TrainConfig) -> None:
    """ConfigError when train.divergence cannot be computed from the store's targets (Codec.divergences: e.g.
    reverse KL from a sampled store); CE-only training (alpha == 1) never reads the store."""
    problem = store.codec.check_divergence(cfg.divergence, cfg.beta) if store is not None and cfg.alpha < 1 else None
    if problem:
        raise ConfigError(problem)


def _no_teacher(start: int, end: int) -> torch.Tensor:
    raise AssertionError("teacher logits requested for a batch without counted tokens")
