"""Distil a student from a teacher-logit store in a plain PyTorch loop, with distill_pipe's public API.

    python docs/examples/plain_loop.py --store stages/teacher_logits/logits.zarr --student path/to/student \
        --out student-kd --alpha 0.5 --temperature 2 --batch-size 4 --accumulation 2 --max-steps 100

--student is a Hugging Face folder (or hub id) holding the initial student and the teacher's tokenizer. With the
train stage's settings (train.* of params.yaml) and the same initial weights, this loop reproduces a
`distill-pipe train` run: the same losses, and on CPU bit-equal weights (tests/test_api.py).
Under torchrun each rank takes its share of every step (EpochSampler's rank/world_size) and the gradients
are averaged by DDP; DistillLoss divides by the step's global token count and undoes the average.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_pipe import Collate, DistillLoss, EpochSampler, StoreDataset, make_optimizer, make_scheduler, open_store


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default=None, help="the tokens.zarr the store must have been made from")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-sequences", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    store = open_store(a.store, tokens=a.tokens)  # complete, and made from --tokens when given
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.student)
    # refuses a temperature or divergence the store cannot give and a tokenizer it was not made with
    loss_fn = DistillLoss(store, student, tok, alpha=a.alpha, temperature=a.temperature,
                          divergence=a.divergence, beta=a.beta)

    train = StoreDataset(store, "train")
    sampler = EpochSampler(train, seed=a.seed, batch_size=a.batch_size, rank=rank, world_size=world)
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler,
                        collate_fn=Collate(store, teacher=a.alpha < 1))
    val = DataLoader(StoreDataset(store, "validation", max_sequences=a.eval_sequences), batch_size=a.batch_size,
                     collate_fn=Collate(store, teacher=a.alpha < 1))
    steps_per_epoch = math.ceil(len(train) / (a.batch_size * a.accumulation * world))
    total_steps = a.max_steps or max(1, math.ceil(a.epochs * steps_per_epoch))
    optimizer = make_optimizer(student, a.lr, a.weight_decay)  # the train stage's AdamW and schedule
    scheduler = make_scheduler(optimizer, a.warmup_steps, total_steps)

    history, step, epoch = [], 0, 0
    student.train()
    while step < total_steps:
        sampler.set_epoch(epoch)  # the data order of epoch `epoch`
        micro_batches = iter(loader)
        while step < total_steps and (batches := list(itertools.islice(micro_batches, a.accumulation))):
            metrics = loss_fn.backward(student, batches)  # divides by the step's global token count, once
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), a.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, **metrics})
            if rank == 0:
                print(f"step {step}: loss {metrics['loss']:.4f} over {metrics['tokens']} tokens", flush=True)
        epoch += 1
    final = loss_fn.evaluate(student, val)  # sum over every validation token / their count
    if rank == 0:
        print(f"eval loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f}")
        student.save_pretrained(a.out)
        tok.save_pretrained(a.out)
    return {"history": history, "eval": final}


if __name__ == "__main__":
    main()
