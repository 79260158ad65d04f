"""The public API for your own training loop (distill_pipe/api.py) and its two examples (docs/examples/): a plain
PyTorch loop and a Hugging Face Trainer subclass both reproduce a `distill-pipe train` run of the same settings
(same losses, bit-equal weights after 2 optimizer steps on CPU); accumulation 2x2 equals 1x4; a store that cannot
give the asked temperature or divergence, tokens of other data and another tokenizer are refused in one line."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill_pipe.config import ConfigError, load_config

from conftest import REPO, build_store_project, make_tiny_llama, make_tokenizer, write_project

sys.path.insert(0, str(REPO / "docs" / "examples"))
import hf_trainer  # noqa: E402
import plain_loop  # noqa: E402

STORE = "stages/teacher_logits/logits.zarr"
TRAIN = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=2, eval_steps=2, save_steps=2, warmup_steps=1,
             learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, max_eval_sequences=6, seed=3)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher) -> Path:
    """A factored store of the tiny teacher, and a 1-layer pretrained student with its tokenizer."""
    root = build_store_project(tmp_path_factory.mktemp("api_project"), tiny_teacher, {"codec": "factored"})
    from transformers import AutoTokenizer

    make_tiny_llama(root / "student", AutoTokenizer.from_pretrained(tiny_teacher), layers=1, seed=5)
    return root


@pytest.fixture
def proj(project, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(project, root)
    monkeypatch.chdir(root)
    return root


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def example_args(root: Path, out: str, **kw) -> list[str]:
    t = {**TRAIN, **kw}
    return ["--store", STORE, "--student", str(root / "student"), "--out", str(root / out),
            "--alpha", "0.5", "--temperature", "2.0", "--batch-size", str(t["batch_size"]),
            "--accumulation", str(t["gradient_accumulation_steps"]), "--lr", str(t["learning_rate"]),
            "--weight-decay", str(t["weight_decay"]), "--warmup-steps", str(t["warmup_steps"]),
            "--max-steps", str(t["max_steps"]), "--max-grad-norm", str(t["max_grad_norm"]), "--seed", str(t["seed"]),
            "--eval-sequences", str(t["max_eval_sequences"])]


def cli_run(root: Path) -> tuple[list[dict], dict, dict]:
    """`distill-pipe train` of the same student and settings: (train rows, eval row at the last step, weights)."""
    from distill_pipe.metrics import read_history
    from distill_pipe.train import run_train

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(TRAIN)
    params["students"] = {"kd": {"init": {"pretrained": str(root / "student")}, "alpha": 0.5, "temperature": 2.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_train(load_config(), "kd")
    live = Path("stages/dvclive/kd")
    return read_history(live, "train"), read_history(live, "eval")[-1], weights(out / "model")


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different}"


def test_the_plain_loop_reproduces_the_cli_run_bit_for_bit_and_hf_trainer_to_rounding(proj):
    cli_rows, cli_eval, cli_weights = cli_run(proj)
    init = weights(proj / "student")
    assert any(not torch.equal(init[k], cli_weights[k]) for k in init)  # the run changed the student

    plain = plain_loop.main(example_args(proj, "plain"))
    assert [h["step"] for h in plain["history"]] == [1, 2]
    assert [h["loss"] for h in plain["history"]] == [float(r["loss"]) for r in cli_rows]  # the same floats
    assert [h["tokens"] for h in plain["history"]] == [int(r["tokens"]) for r in cli_rows]
    assert plain["eval"]["eval_loss"] == float(cli_eval["eval_loss"])
    assert_bit_equal(weights(proj / "plain"), cli_weights)

    hf = hf_trainer.main(example_args(proj, "hf"))
    assert [h["step"] for h in hf["history"]] == [1, 2]
    # the Trainer sums the micro-batches' normalised losses in float32; the stage sums in float64 and divides once
    np.testing.assert_allclose([h["loss"] for h in hf["history"]], [float(r["loss"]) for r in cli_rows], rtol=1e-6)
    # Hugging Face's Trainer backpropagates the loss itself, so there the head's gradient reaches .grad through
    # autograd (a buffer, then scaled) rather than scaled in the chunk loop: the same sums, rounded differently.
    hf_weights = weights(proj / "hf")
    assert hf_weights.keys() == cli_weights.keys()
    for k in cli_weights:
        torch.testing.assert_close(hf_weights[k], cli_weights[k], rtol=1e-5, atol=1e-6)


def test_accumulation_2x2_equals_1x4_through_the_api(proj):
    a = plain_loop.main(example_args(proj, "a", batch_size=2, gradient_accumulation_steps=2))
    b = plain_loop.main(example_args(proj, "b", batch_size=4, gradient_accumulation_steps=1))
    assert [h["tokens"] for h in a["history"]] == [h["tokens"] for h in b["history"]]
    np.testing.assert_allclose([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], rtol=1e-6)
    wa, wb = weights(proj / "a"), weights(proj / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=0)


def test_a_per_micro_batch_mean_would_differ(proj):
    """The check above can fail: normalising each micro-batch by its own count (the classic bug) moves the weights."""
    from transformers import AutoModelForCausalLM

    from distill_pipe import Collate, DistillLoss, StoreDataset, open_store

    store = open_store(STORE)
    ds, collate = StoreDataset(store, "train"), Collate(store)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(proj / "student")
    grads = []
    for per_micro in (False, True):
        model = AutoModelForCausalLM.from_pretrained(proj / "student")
        loss_fn = DistillLoss(store, model, tok, alpha=0.5, temperature=2.0)
        batches = [collate(ds.__getitems__([0, 1])), collate(ds.__getitems__([2]))]
        batches[1]["shift_labels"][:, 5:] = -100  # micro-batches of unequal token counts
        if per_micro:
            for b in batches:
                s = loss_fn(model, b)
                (s.loss / s.num_tokens / len(batches)).backward()
        else:
            loss_fn.backward(model, batches)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dataset_rows_and_order_are_the_trainers(proj):
    """Targets (and chat masks) are the trainer's make_targets; EpochSampler's order is Trainer.step_indices'."""
    from distill_pipe import EpochSampler, StoreDataset, open_store
    from distill_pipe.losses import IGNORE_INDEX
    from distill_pipe.batches import next_token_targets

    store = open_store(STORE)
    ds = StoreDataset(store, "train")
    rows = ds.__getitems__([4, 0, 4])
    ids = torch.from_numpy(np.asarray(store.input_ids("train")[[4, 0, 4]], dtype=np.int64))
    assert torch.equal(torch.stack([r["input_ids"] for r in rows]), ids)
    want = next_token_targets(ids, None)
    assert torch.equal(torch.stack([r["shift_labels"] for r in rows]), want)
    labels = torch.stack([r["labels"] for r in rows])
    assert (labels[:, 0] == IGNORE_INDEX).all() and torch.equal(labels[:, 1:], want[:, :-1])
    mask = np.ones((2, ids.shape[1]), dtype=np.uint8)
    mask[0, 3:7] = 0
    masked = next_token_targets(ids[:2], mask)
    assert (masked[0, 2:6] == IGNORE_INDEX).all() and (masked[0, 6:-1] != IGNORE_INDEX).all()

    n = len(ds)
    s = EpochSampler(ds, seed=7)
    s.set_epoch(1)
    order = list(s)
    assert sorted(order) == list(range(n))
    want_order = np.random.default_rng([7, 1]).permutation(n).tolist()
    assert order == want_order
    ranks = [list(EpochSampler(n, seed=7, batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    epoch0 = np.random.default_rng([7, 0]).permutation(n).tolist()
    assert ranks[0][:4] == epoch0[0:2] + epoch0[4:6] and ranks[1][:2] == epoch0[2:4]
    assert sorted(ranks[0] + ranks[1]) == list(range(n))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_a_temperature_or_divergence_the_store_cannot_give_is_refused(tmp_path, tiny_teacher, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_pipe import DistillLoss, open_store

    root = build_store_project(tmp_path, tiny_teacher, {"codec": "sampled"})  # the teacher at T = 1 only
    monkeypatch.chdir(root)
    store = open_store(STORE)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)
    with pytest.raises(ConfigError) as e:
        DistillLoss(store, model, tok, alpha=0.5, temperature=2.0)
    assert "set train.temperature 1" in one_line(e)
    with pytest.raises(ConfigError) as e:
        DistillLoss(store, model, tok, alpha=0.5, temperature=1.0, divergence="reverse_kl")
    assert "cannot be computed from the sampled store" in one_line(e) and "use train.divergence" in str(e.value)
    with pytest.raises(ConfigError) as e:
        DistillLoss(store, model, tok, alpha=1.5, temperature=1.0)
    assert "DistillLoss.alpha must be in [0, 1]" in one_line(e)
    assert DistillLoss(store, model, tok, alpha=0.5, temperature=1.0).vocab_size == len(tok)
    assert DistillLoss(store, model, tok, alpha=1.0, temperature=2.0).vocab_size == len(tok)  # CE only: no check


def test_tokens_of_other_data_and_another_tokenizer_are_refused(proj, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill_pipe import DistillLoss, open_store
    from distill_pipe.data import run_prepare
    from distill_pipe.train import TrainError

    assert open_store(STORE, tokens="stages/prepare/tokens.zarr").location == STORE  # the tokens it was made from
    (tmp_path / "other").mkdir()
    other = write_project(tmp_path / "other", load_config().teacher.model, doc_chars=900, seq_len=16)
    cwd = os.getcwd()
    os.chdir(other)
    try:
        run_prepare(load_config())
    finally:
        os.chdir(cwd)
    with pytest.raises(TrainError) as e:
        open_store(STORE, tokens=other / "stages/prepare/tokens.zarr")
    assert "is not the data" in one_line(e) and "rerun `distill-pipe teacher-logits" in str(e.value)

    tok = make_tokenizer(tmp_path / "tok", vocab_size=280)
    make_tiny_llama(tmp_path / "stranger", tok, layers=1)
    with pytest.raises(TrainError) as e:
        DistillLoss(open_store(STORE), AutoModelForCausalLM.from_pretrained(tmp_path / "stranger"), tok, alpha=0.5,
                    temperature=2.0)
    assert "a student must use the teacher's tokenizer" in one_line(e)


def test_an_incomplete_store_is_refused(proj):
    from distill_pipe import open_store
    from distill_pipe.store import StoreIncompleteError
    from distill_pipe.store import open_store as open_raw

    open_raw(STORE, mode="r+").array("train", "done")[0] = 0  # shard 0 never flagged done
    with pytest.raises(StoreIncompleteError) as e:
        open_store(STORE)
    assert "train" in one_line(e)
