"""Micro-batches of a training run: the data order, per-rank micro-batching, targets and reading ahead.

Shapes: B sequences per micro-batch, L sequence length. One optimizer step takes the next GLOBAL batch of
G = batch_size * gradient_accumulation_steps * world sequences from a per-epoch permutation seeded by
(train.seed, epoch), so the data order depends on the seed and G only; micro-batch k of it goes to rank
k % world. `BatchSource` is mixed into `Trainer` (trainer.py), which provides cfg, info, device, data,
target_masks, num_train, steps_per_epoch, global_batch and _pin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill_pipe.losses import IGNORE_INDEX, count_targets, shift_for_next_token
from distill_pipe.prefetch import HostTokens, MicroBatchPlan, MicroBatchStream, PendingBatch, host_tokens


@dataclass
class Batch:
    """One micro-batch of whole sequences of one split."""

    split: str
    indices: list[int]
    """Sequence indices in the split, in row order of input_ids_BL."""
    input_ids_BL: torch.Tensor  # (B, L) int64 on the training device
    targets_BL: torch.Tensor  # (B, L) int64, IGNORE_INDEX where not counted
    count: int | None = None
    """Counted targets when known from the CPU copy (read ahead: no device sync); None: counted here."""
    teacher: object | None = None
    """The teacher payload on the training device when it was read ahead (a TeacherBatch), else None."""

    @property
    def num_tokens(self) -> int:
        return self.count if self.count is not None else count_targets(self.targets_BL)



def read_rows(array, indices: Sequence[int]) -> np.ndarray:
    """Rows `indices` (any order) of an (N, L) numpy or zarr array, read without loading the rest."""
    idx = np.asarray(indices, dtype=np.int64)
    if isinstance(array, np.ndarray):
        return array[idx]
    order = np.argsort(idx, kind="stable")
    uniq, inverse = np.unique(idx[order], return_inverse=True)
    rows = np.asarray(array.oindex[uniq, :]) if hasattr(array, "oindex") else np.stack([array[int(i)] for i in uniq])
    out = np.empty((len(idx), rows.shape[1]), dtype=rows.dtype)
    out[order] = rows[inverse]
    return out


def epoch_order(seed: int, epoch: int, num_sequences: int) -> np.ndarray:
    """The training split's order in `epoch`: a permutation that depends on the seed and the epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def next_token_targets(input_ids_BL: torch.Tensor, mask_BL: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """Next-token targets (B, L) int64, IGNORE_INDEX at the last position and, with a target mask (B, L: 1 where
    token t is a target, e.g. an assistant's answer), wherever the next token is not a target."""
    targets_BL = shift_for_next_token(input_ids_BL)
    if mask_BL is not None:
        mask_BL = torch.as_tensor(mask_BL).to(targets_BL.device)
        targets_BL[:, :-1].masked_fill_(mask_BL[:, 1:] == 0, IGNORE_INDEX)
    return targets_BL


class BatchSource:
    """What a step reads: its global batch (step_indices), this rank's micro-batches, their targets, and the
    read-ahead stream (train.prefetch). Subclasses override make_targets, teacher_loader, teacher_to_device."""

    def make_targets(self, input_ids_BL: torch.Tensor, split: str, indices: list[int]) -> torch.Tensor:
        """Next-token targets (B, L), IGNORE_INDEX where the split's target mask says the next token is not a
        target; override to exclude more positions (they leave the count too)."""
        mask = self.target_masks.get(split)
        return next_token_targets(input_ids_BL, None if mask is None else read_rows(mask, indices))

    # data order

    def step_indices(self, step: int) -> list[int]:
        """The global batch of optimizer step `step`: depends on the seed and the global batch size only."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        G = self.global_batch
        return epoch_order(self.cfg.seed, epoch, self.num_train)[pos * G:(pos + 1) * G].tolist()

    def micro_batches(self, split: str, indices: list[int], micro_steps: int | None = None) -> list[Batch]:
        """This rank's micro-batches of a global batch: micro-batch k = indices[k*b:(k+1)*b] goes to
        rank k % world. Every rank gets the same number; a rank short of data gets a padding batch
        (one sequence, no counted token) so FSDP's collectives stay in lockstep."""
        return [self.padding_batch(p.split, p.indices[0]) if p.padding else self.make_batch(p.split, list(p.indices))
                for p in self.micro_batch_plans(split, indices, micro_steps)]

    def micro_batch_plans(self, split: str, indices: list[int], micro_steps: int | None = None) -> list[MicroBatchPlan]:
        """What `micro_batches` reads, without reading it (the read-ahead stream loads these)."""
        b, world, rank = self.cfg.batch_size, self.info.world_size, self.info.rank
        n_micro = micro_steps or max(1, math.ceil(len(indices) / (b * world)))
        out = []
        for m in range(n_micro):
            k = m * world + rank
            part = indices[k * b:(k + 1) * b]
            out.append(MicroBatchPlan(split, tuple(part)) if part else MicroBatchPlan(split, (indices[0],), True))
        return out

    def make_batch(self, split: str, indices: list[int]) -> Batch:
        ids_BL = torch.from_numpy(read_rows(self.data[split], indices).astype(np.int64)).to(self.device)
        return Batch(split, list(indices), ids_BL, self.make_targets(ids_BL, split, list(indices)).to(self.device))

    def padding_batch(self, split: str, index: int) -> Batch:
        batch = self.make_batch(split, [index])
        batch.targets_BL.fill_(IGNORE_INDEX)
        return batch

    # reading ahead (train.prefetch)

    def load_tokens(self, plan: MicroBatchPlan) -> HostTokens:
        """Runs in a read-ahead thread: token rows and targets on the CPU, pinned for an async copy."""
        return host_tokens(plan, read_rows(self.data[plan.split], list(plan.indices)), self.make_targets, self._pin)

    def teacher_loader(self) -> Callable[[MicroBatchPlan], object] | None:
        """What else a micro-batch reads ahead (subclasses: the teacher payload); None for nothing."""
        return None

    def teacher_to_device(self, payload):
        return payload

    def open_stream(self, steps) -> MicroBatchStream | None:
        """Read-ahead of `steps` (an iterator of (split, indices, micro_steps)); None when train.prefetch is 0."""
        if not self.cfg.prefetch:
            return None
        plans = (self.micro_batch_plans(split, idx, micro) for split, idx, micro in steps)
        return MicroBatchStream(plans, self.load_tokens, self.teacher_loader(), depth=self.cfg.prefetch)

    def materialize(self, batch: Batch | PendingBatch) -> Batch:
        """A read-ahead micro-batch on the device (non-blocking copies from pinned memory); a Batch as is."""
        if isinstance(batch, Batch):
            return batch
        host = batch.tokens()
        payload = batch.teacher()
        nb = self._pin
        return Batch(host.plan.split, list(host.plan.indices), host.input_ids_BL.to(self.device, non_blocking=nb),
                     host.targets_BL.to(self.device, non_blocking=nb), count=host.num_tokens,
                     teacher=None if payload is None else self.teacher_to_device(payload))
