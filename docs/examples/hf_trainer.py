"""Distil a student from a teacher-logit store with Hugging Face's `Trainer`, through distill_pipe's public API.

    python docs/examples/hf_trainer.py --store stages/teacher_logits/logits.zarr --student path/to/student \
        --out student-kd --alpha 0.5 --temperature 2 --batch-size 4 --accumulation 2 --max-steps 100

A `Trainer` subclass whose compute_loss is DistillLoss.hf_loss: the micro-batch's loss sum over the token count
the Trainer takes over all accumulation micro-batches of the step (num_items_in_batch, from the "labels" that
Collate provides) and over all ranks (average_tokens_across_devices), so accumulation and data parallelism stay
exact. With the train stage's data order (EpochSampler), optimizer and schedule (make_optimizer,
make_scheduler) it reproduces a `distill-pipe train` run: on CPU bit-equal weights (tests/test_api.py).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from distill_pipe import Collate, DistillLoss, EpochSampler, StoreDataset, make_optimizer, make_scheduler, open_store
from plain_loop import parse  # the same command line as plain_loop.py, beside this file


class DistillTrainer(Trainer):
    """Trainer whose loss is distillation from the store (DistillLoss), normalised by the step's token count."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's count: no second division by GA

    def __init__(self, *args, distill_loss: DistillLoss, data_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_loss, self.data_seed = distill_loss, data_seed
        self.model_accepts_loss_kwargs = True  # the Trainer counts the step's tokens and passes num_items_in_batch

    def _get_train_sampler(self, train_dataset=None):
        # the train stage's data order; the Trainer (accelerate) shards its batches over ranks, as the stage does
        return EpochSampler(train_dataset or self.train_dataset, seed=self.data_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.distill_loss.hf_loss(model, inputs, num_items_in_batch, self.args)
        return (loss, None) if return_outputs else loss


def main(argv=None) -> dict:
    a = parse(argv)
    store = open_store(a.store, tokens=a.tokens)
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.student)
    loss_fn = DistillLoss(store, student, tok, alpha=a.alpha, temperature=a.temperature,
                          divergence=a.divergence, beta=a.beta)
    train = StoreDataset(store, "train")
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.accumulation,
        max_steps=a.max_steps or -1, num_train_epochs=a.epochs, max_grad_norm=a.max_grad_norm, seed=a.seed,
        remove_unused_columns=False,  # keep the store's split and indices: Collate reads the teacher with them
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda, dataloader_pin_memory=cuda)
    student.to(args.device)
    world = args.world_size
    steps_per_epoch = math.ceil(len(train) / (a.batch_size * a.accumulation * world))
    total_steps = a.max_steps or max(1, math.ceil(a.epochs * steps_per_epoch))
    optimizer = make_optimizer(student, a.lr, a.weight_decay)  # the train stage's AdamW and schedule
    scheduler = make_scheduler(optimizer, a.warmup_steps, total_steps)
    trainer = DistillTrainer(model=student, args=args, train_dataset=train,
                             data_collator=Collate(store, teacher=a.alpha < 1), optimizers=(optimizer, scheduler),
                             distill_loss=loss_fn, data_seed=a.seed)
    trainer.train()
    val = DataLoader(StoreDataset(store, "validation", max_sequences=a.eval_sequences), batch_size=a.batch_size,
                     collate_fn=Collate(store, teacher=a.alpha < 1))
    final = loss_fn.evaluate(student, val)  # sum over every validation token / their count
    if trainer.is_world_process_zero():
        print(f"eval loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f}")
        trainer.save_model(a.out)
        tok.save_pretrained(a.out)
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return {"history": history, "eval": final}


if __name__ == "__main__":
    main()
