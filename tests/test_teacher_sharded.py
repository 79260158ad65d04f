"""The teacher under torchrun never exists whole on a host: built on the meta device, FSDP2-sharded, each rank
reading only its own rows of the safetensors. Checked against the whole model (2 real gloo processes), and
the teacher stage's store with 2 ranks against 1 process, in bf16 and through the whole-model fallback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distill_pipe.store import open_store

from conftest import run_cli as run
from test_teacher import store_arrays


def _rank(rank: int, world: int, port: int, teacher: str, dtype_name: str, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        import torch.distributed as dist

        from distill_pipe import distributed, models

        dist.init_process_group("gloo", rank=rank, world_size=world)
        dtype = models.DTYPES[dtype_name]
        src = models.resolve(teacher)
        ref = models.load_causal_lm(src, dtype=dtype)  # first: transformers binds safe_open when it imports
        read = []
        from safetensors import safe_open as real_open

        def counting_open(*a, **kw):  # record every byte range read: each rank must read only its rows
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

        import safetensors
        safetensors.safe_open = counting_open
        model = models.load_causal_lm_sharded(src, dtype, torch.device("cpu"),
                                              lambda m: distributed.fsdp_wrap(m, param_dtype=None))
        safetensors.safe_open = real_open
        assert model is not None
        ref_params = dict(ref.named_parameters())
        total = sum(p.numel() for p in ref.parameters())
        param_reads = sum(n for name, n, _ in read if name in ref_params)
        # a rank reads its share of the parameters (rows split ceil(n/2) / rest), never the whole model
        assert param_reads <= total // world + 4096, (param_reads, total)
        for name, p in model.named_parameters():
            full = p.full_tensor()
            assert full.dtype == dtype
            assert torch.equal(full, ref_params[name].detach()), name
        ref_buffers = dict(ref.named_buffers())
        for name, b in model.named_buffers():
            assert torch.equal(b, ref_buffers[name]), name  # rotary inv_freq recomputed after to_empty
        ids = torch.arange(40).reshape(2, 20) % 250
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits.float()
        assert got.dtype == torch.float32  # output_dtype float32 on the root
        torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise SystemExit(1) from e


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_rank_reads_only_its_shard_and_the_model_equals_the_whole(tiny_teacher, dtype):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tiny_teacher), dtype, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs)


@pytest.fixture
def prepared(project):
    assert run("prepare")[0] == 0
    return project


@pytest.mark.parametrize("kind", ["safetensors-bf16", "bin-fallback"])
def test_two_ranks_equal_one(prepared, tiny_teacher, tmp_path, kind):
    teacher = tiny_teacher
    dtype = "bfloat16" if kind == "safetensors-bf16" else "float32"
    if kind == "bin-fallback":  # a .bin checkpoint cannot be read by rows: every rank loads it whole
        import shutil

        from safetensors.torch import load_file

        teacher = tmp_path / "bin_teacher"
        shutil.copytree(tiny_teacher, teacher)
        torch.save(load_file(teacher / "model.safetensors"), teacher / "pytorch_model.bin")
        (teacher / "model.safetensors").unlink()
    args = ["--set", "teacher_logits.shard_size=3", "--set", "teacher_logits.batch_size=2",
            "--set", f"teacher.dtype={dtype}", "--set", f"teacher.model={teacher}"]
    code, out = run("teacher-logits", *args, "--set", "paths.logits=one.zarr")
    assert code == 0, out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "distill_pipe", "teacher-logits", *args, "--set", "paths.logits=two.zarr"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    fallback = "cannot be read shard by shard: every rank loads it whole" in log
    assert fallback == (kind == "bin-fallback") and ("shard by shard: FSDP" in log) != fallback, log[-3000:]
    one, two = store_arrays("one.zarr"), store_arrays("two.zarr")
    assert one.keys() == two.keys()
    for k in one:
        if one[k].dtype == np.float16:
            np.testing.assert_allclose(two[k].astype(np.float32), one[k].astype(np.float32), atol=1e-3, rtol=0)
        else:
            np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    a, b = open_store("one.zarr"), open_store("two.zarr")
    assert torch.equal(a.head.weight_VD, b.head.weight_VD)  # gathered from the shards, rounded to the dtype alike
    for split in a.splits:
        for i in range(a.num_sequences(split)):
            assert (a.logprobs(split, i) - b.logprobs(split, i)).abs().max().item() < 1e-3
