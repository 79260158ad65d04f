"""The teacher under torchrun never exists whole on a host: built on the meta device, FSDP2-sharded, each rank
reading only its own rows of the safetensors. Checked against the whole model (2 real gloo processes), and
the teacher stage's store with 2 ranks against 1 process, in bf16 and through the whole-model fallback."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distill_pipe.store import open_store

from conftest import assert_one_line_error
from test_faults import store_arrays


# (tied embeddings, dtype, fsdp_wrap inference): inference=True is the teacher stage's wrap (embedding and head
# whole on every rank, outside FSDP), where to_empty untied a tied head (issue 21)
CASES = [(tied, dtype, inference) for tied in (False, True) for dtype in ("float32", "bfloat16")
         for inference in (False, True)]


def _counting_open(real_open, read: list):
    """safetensors.safe_open that records (key, elements read, shape) of every tensor or slice read."""

    def counting_open(*a, **kw):
        handle = real_open(*a, **kw)

        class Wrapped:
            def __enter__(self):
                f = handle.__enter__()

                class F:
                    def get_slice(self, name):
                        sl = f.get_slice(name)

                        class S:
                            def __getitem__(self, idx):
                                out = sl[idx]
                                read.append((name, out.numel(), sl.get_shape()))
                                return out
                        return S()

                    def get_tensor(self, name):
                        out = f.get_tensor(name)
                        read.append((name, out.numel(), list(out.shape)))
                        return out

                    def keys(self):
                        return f.keys()
                return F()

            def __exit__(self, *exc):
                return handle.__exit__(*exc)
        return Wrapped()
    return counting_open


def _check_load(world: int, teacher: str, tied: bool, dtype_name: str, inference: bool) -> None:
    import safetensors

    from distill_pipe import distributed, models

    case = f"tied={tied} {dtype_name} inference={inference}"
    dtype = models.DTYPES[dtype_name]
    src = models.resolve(teacher)
    ref = models.load_causal_lm(src, dtype=dtype)  # first: transformers binds safe_open when it imports
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied, case
    read: list = []
    real_open = safetensors.safe_open
    safetensors.safe_open = _counting_open(real_open, read)
    try:
        model = models.load_causal_lm_sharded(src, dtype, torch.device("cpu"),
                                              lambda m: distributed.fsdp_wrap(m, param_dtype=None, inference=inference))
    finally:
        safetensors.safe_open = real_open
    assert model is not None, case
    ref_params = dict(ref.named_parameters())  # a tied head is listed once, as model.embed_tokens.weight
    whole = {"model.embed_tokens.weight", "lm_head.weight"} if inference else set()
    reads: dict[str, int] = {}
    for name, n, _ in read:
        reads[name] = reads.get(name, 0) + n
    # what a rank keeps whole it reads once, in full; the rest it reads its share of (rows split ceil(n/2) / rest)
    for name in whole & set(ref_params):
        assert reads.get(name) == ref_params[name].numel(), (case, name, reads.get(name))
    sharded = sum(n for name, n in reads.items() if name in ref_params and name not in whole)
    assert sharded <= sum(p.numel() for k, p in ref_params.items() if k not in whole) // world + 4096, (case, sharded)
    if tied:  # one tensor under both names, as in the whole model: no second V x d copy
        local = [t.to_local() if hasattr(t, "to_local") else t
                 for t in (model.lm_head.weight, model.model.embed_tokens.weight)]
        assert model.lm_head.weight is model.model.embed_tokens.weight, case
        assert local[0].data_ptr() == local[1].data_ptr(), case
    assert sorted(n for n, _ in model.named_parameters()) == sorted(ref_params), case
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert full.dtype == dtype, (case, name)
        assert torch.equal(full, ref_params[name].detach()), (case, name)
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, ref_buffers[name]), (case, name)  # rotary inv_freq recomputed after to_empty
    ids = torch.arange(40).reshape(2, 20) % 250
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits.float()
    assert got.dtype == torch.float32, case  # output_dtype float32 on the root
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0, msg=case)


def _rank(rank: int, world: int, port: int, teachers: dict, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        for tied, dtype_name, inference in CASES:
            _check_load(world, teachers[tied], tied, dtype_name, inference)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise SystemExit(1) from e


def test_each_rank_reads_only_its_shard_and_the_model_equals_the_whole(tiny_teacher, tiny_tied_teacher):
    """Untied and tied teachers, fp32 and bf16, FSDP over everything and the teacher stage's wrap (embedding and head
    whole, outside FSDP): each rank reads only its rows (what it keeps whole, once), and the sharded model equals the
    whole one, a tied head kept as one tensor."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    teachers = {False: str(tiny_teacher), True: str(tiny_tied_teacher)}
    procs = [ctx.Process(target=_rank, args=(r, 2, port, teachers, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs)


def _bin_teacher(tiny_teacher, folder: Path) -> Path:
    """The tiny teacher as a .bin checkpoint, which cannot be read by rows: every rank loads it whole."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_teacher, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("kind, dtype, codec", [
    ("untied", "float32", "factored"), ("untied", "bfloat16", "factored"), ("tied", "float32", "factored"),
    ("tied", "bfloat16", "factored"), ("tied", "bfloat16", "dense-bf16"), ("bin-fallback", "float32", "factored")])
def test_two_ranks_equal_one_bit_for_bit(kill_project, zygote, tiny_teacher, tiny_tied_teacher, tmp_path, kind, dtype,
                                         codec):
    """The teacher stage under 2 ranks (the meta build, FSDP2, rows read per rank; a tied head kept tied) writes the
    store 1 process writes, bit for bit: same threads (the zygote's), same batches per shard."""
    teacher = ({"untied": tiny_teacher, "tied": tiny_tied_teacher}.get(kind)
               or _bin_teacher(tiny_teacher, tmp_path / "bin"))
    # shards of 3, batches of 2: the ranks get different numbers of shards, and partial batches
    args = ("teacher-logits", "--set", f"teacher.model={teacher}", "--set", f"teacher.dtype={dtype}",
            "--set", f"teacher_logits.codec={codec}", "--set", "teacher_logits.shard_size=3",
            "--set", "teacher_logits.batch_size=2")
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    codes, out = zygote.run(kill_project, *args, "--set", f"paths.logits={one}", world=1)
    assert codes == [0], out[-3000:]
    codes, out = zygote.run(kill_project, *args, "--set", f"paths.logits={two}", world=2)
    assert codes == [0, 0], out[-3000:] + zygote.output(1)[-3000:]
    fallback = "cannot be read shard by shard: every rank loads it whole" in out
    assert fallback == (kind == "bin-fallback") and ("shard by shard: FSDP" in out) != fallback, out[-3000:]
    a, b = store_arrays(one), store_arrays(two)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    if codec == "factored":  # the head gathered from the ranks (a tied one: the embedding), rounded to the dtype alike
        assert torch.equal(open_store(one).head.weight_VD, open_store(two).head.weight_VD)


def test_a_load_failure_on_one_rank_is_one_line_on_every_rank(kill_project, zygote, tiny_tied_teacher, tmp_path):
    """An unexpected error while one rank loads its shard (here: rank 1, after its rows are read): every rank exits
    1 with one line naming it, no traceback, and no rank is left waiting in a collective."""
    codes, out = zygote.run(kill_project, "teacher-logits", "--set", f"teacher.model={tiny_tied_teacher}",
                            "--set", f"paths.logits={tmp_path / 'x.zarr'}", world=2,
                            fail={"distill_pipe.models._fill_buffers": (1, "RuntimeError", "injected load failure")})
    assert codes == [1, 1], out
    for rank in (0, 1):
        assert_one_line_error(1, zygote.output(rank), "rank 1: cannot load the teacher")
        assert "injected load failure" in zygote.output(rank), zygote.output(rank)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("world", [1, 2])
def test_a_damaged_teacher_file_is_one_line(kill_project, zygote, tiny_tied_teacher, tmp_path, world):
    """A truncated model.safetensors (an interrupted download): one line per rank, not a traceback."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_tied_teacher, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    codes, out = zygote.run(kill_project, "teacher-logits", "--set", f"teacher.model={teacher}",
                            "--set", f"paths.logits={tmp_path / 'x.zarr'}", world=world)
    assert codes == [1] * world, out
    for rank in range(world):
        assert_one_line_error(1, zygote.output(rank), "download or save it again")
