"""Reading micro-batches ahead of the training loop, so the device never waits on the store.

Shapes: B sequences per micro-batch, L sequence length.

The loop asks for one optimizer step's micro-batches at a time (`MicroBatchStream.next_step`). Their token
rows and targets are read as soon as the step is planned (cheap: the step's token count must be known
before its first backward), and the teacher payloads (read + decompress, the expensive part) of the next
`depth` micro-batches are read in background threads while the current one computes; zarr and numcodecs
release the GIL while they decompress. Host tensors are pinned when CUDA is available and copied with
non_blocking=True; token counts come from the CPU copy, so nothing forces a device sync before a read.

Loading ahead changes when a micro-batch is read, never what it holds or in which order it is used: the
data order, the exact accumulation and the resume position are those of the synchronous path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from distill_pipe.losses import IGNORE_INDEX, count_targets


@dataclass(frozen=True)
class MicroBatchPlan:
    """What one micro-batch reads: sequences `indices` of `split`; padding = no counted token (FSDP lockstep)."""

    split: str
    indices: tuple[int, ...]
    padding: bool = False


@dataclass
class HostTokens:
    """A micro-batch's token rows and targets on the CPU (pinned when CUDA is available)."""

    plan: MicroBatchPlan
    input_ids_BL: torch.Tensor  # (B, L) int64
    targets_BL: torch.Tensor  # (B, L) int64
    num_tokens: int


def pin(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    return t.pin_memory() if enabled and not t.is_pinned() else t


class StreamTimer:
    """Seconds the training thread spent blocked on background reads (the store's share of the step)."""

    def __init__(self):
        self.wait_s = 0.0

    def wait(self, future: Future):
        t0 = time.perf_counter()
        try:
            return future.result()
        finally:
            self.wait_s += time.perf_counter() - t0


class PendingBatch:
    """One planned micro-batch: its tokens (a future) and its teacher payload (a future once submitted)."""

    def __init__(self, stream: MicroBatchStream, plan: MicroBatchPlan, tokens: Future):
        self.stream, self.plan, self._tokens = stream, plan, tokens
        self._teacher: Future | None = None

    def tokens(self) -> HostTokens:
        return self.stream.timer.wait(self._tokens)

    @property
    def num_tokens(self) -> int:
        """Counted targets, from the CPU copy (the step's count is needed before its first backward)."""
        return self.tokens().num_tokens

    def teacher(self):
        """The loaded teacher payload (whatever `load_teacher` returns; None for padding or without a loader),
        read now if it was not read ahead. Call it once per micro-batch: that frees a place in the read-ahead."""
        self.stream._submit_teacher_until(self)
        try:
            return self.stream.timer.wait(self._teacher)
        finally:
            self._teacher = None  # the loop holds it now: free our reference with the micro-batch
            self.stream._consumed(self)


class MicroBatchStream:
    """Micro-batches of successive steps, read ahead in `workers` background threads.

    steps: an iterator of steps, each a list of MicroBatchPlan (the order they are used in).
    load_tokens(plan) -> HostTokens; load_teacher(plan) -> a payload, or None (not called for padding).
    depth: teacher payloads read ahead of the one in use (>= 1).
    """

    def __init__(self, steps: Iterator[list[MicroBatchPlan]], load_tokens: Callable[[MicroBatchPlan], HostTokens],
                 load_teacher: Callable[[MicroBatchPlan], object] | None, depth: int, workers: int | None = None):
        if depth < 1:
            raise ValueError(f"MicroBatchStream: depth must be >= 1, got {depth}")
        self._steps = steps
        self._load_tokens, self._load_teacher = load_tokens, load_teacher
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=workers or min(depth, 4), thread_name_prefix="read-ahead")
        self._planned: deque[list[PendingBatch]] = deque()  # steps planned (tokens submitted), not yet handed out
        self._unsubmitted: deque[PendingBatch] = deque()  # planned micro-batches whose teacher is not submitted
        self._ahead = 0  # teacher payloads submitted and not yet consumed
        self._exhausted = False
        self.timer = StreamTimer()

    # ---- planning
    def _plan_next_step(self) -> bool:
        if self._exhausted:
            return False
        try:
            plans = next(self._steps)
        except StopIteration:
            self._exhausted = True
            return False
        step = [PendingBatch(self, p, self._pool.submit(self._load_tokens, p)) for p in plans]
        self._planned.append(step)
        self._unsubmitted.extend(step)
        return True

    def _submit(self, pb: PendingBatch) -> None:
        if self._load_teacher is None or pb.plan.padding:
            pb._teacher = _done(None)
        else:
            pb._teacher = self._pool.submit(self._load_teacher, pb.plan)
        self._ahead += 1

    def _refill(self) -> None:
        while self._ahead < self.depth:
            if not self._unsubmitted and not self._plan_next_step():
                return
            self._submit(self._unsubmitted.popleft())

    def _submit_teacher_until(self, pb: PendingBatch) -> None:
        """Make sure `pb`'s payload is submitted (a depth smaller than the distance to it reads it now)."""
        while pb._teacher is None and self._unsubmitted:
            self._submit(self._unsubmitted.popleft())
        if pb._teacher is None:  # consumed twice: load again rather than fail
            self._submit(pb)

    def _consumed(self, pb: PendingBatch) -> None:
        self._ahead -= 1
        self._refill()

    # ---- use
    def next_step(self) -> list[PendingBatch] | None:
        """The next step's micro-batches (tokens and teacher reads already under way), or None at the end."""
        if not self._planned and not self._plan_next_step():
            return None
        step = self._planned.popleft()
        self._refill()
        return step

    def close(self) -> None:
        """Stop reading ahead (pending reads are cancelled or finish in the background, unused)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._planned.clear()
        self._unsubmitted.clear()

    def __enter__(self) -> MicroBatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def host_tokens(plan: MicroBatchPlan, rows_BL, make_targets: Callable, pin_memory: bool) -> HostTokens:
    """Token rows (numpy) -> HostTokens with targets and their count computed on the CPU."""
    ids_BL = torch.from_numpy(rows_BL).to(torch.int64)
    targets_BL = make_targets(ids_BL, plan.split, list(plan.indices))
    if plan.padding:
        targets_BL = torch.full_like(targets_BL, IGNORE_INDEX)
    return HostTokens(plan, pin(ids_BL, pin_memory), pin(targets_BL, pin_memory),
                      0 if plan.padding else count_targets(targets_BL))
