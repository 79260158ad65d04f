"""Real processes to kill, started fast: a zygote imports torch, transformers and distill_pipe once, then
forks one child per rank for each command (a fresh `python` takes ~10-50 s to import them on a loaded
2-core machine). Each child runs the distill-pipe CLI exactly as the console script does, under torchrun's
environment variables when world > 1; the test SIGKILLs the children at random moments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ZYGOTE = r'''
import builtins, importlib, json, os, resource, sys, time, traceback
import numpy, torch, transformers, zarr
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
import distill_pipe.cli, distill_pipe.data, distill_pipe.evaluate, distill_pipe.teacher, distill_pipe.train
import torch.distributed.checkpoint, torch.distributed.fsdp

def child(job, rank):
    os.chdir(job["cwd"])
    fd = os.open(f"{job['log']}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if job["world"] > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["world"]),
                          LOCAL_WORLD_SIZE=str(job["world"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
    if job.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    def patch(target, make):
        module, name = target.split(":") if ":" in target else target.rsplit(".", 1)  # module[:Class].attr
        obj = importlib.import_module(module)
        *owners, attr = name.split(".")
        for o in owners:
            obj = getattr(obj, o)
        setattr(obj, attr, make(getattr(obj, attr)))
    for target, seconds in job.get("slow", {}).items():  # stretch the work so that kills land inside it
        def make_slow(real, _s=seconds, _t=target):
            def slow(*a, **kw):
                print(f"inside {_t}", file=sys.stderr, flush=True)  # the test kills on this line
                time.sleep(_s)
                return real(*a, **kw)
            return slow
        patch(target, make_slow)
    for target, (fail_rank, error, message) in job.get("fail", {}).items():  # an error on one rank
        def make_fail(real, _e=getattr(builtins, error), _m=message):
            def fail(*a, **kw):
                raise _e(_m)
            return fail
        if rank == fail_rank:
            patch(target, make_fail)
    code = 0
    try:
        distill_pipe.cli.app(job["args"], prog_name="distill-pipe")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for rank in range(job["world"]):
        pid = os.fork()
        if pid == 0:
            child(job, rank)
        pids.append(pid)
    print(json.dumps({"pids": pids}), flush=True)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps({"codes": codes}), flush=True)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Zygote:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready", "the zygote did not start"
        self.pids: list[int] = []
        self.log = ""

    def start(self, cwd: Path, *args: str, world: int = 1, slow: dict | None = None, fsize: int | None = None,
              fail: dict | None = None):
        """slow: {target: seconds} sleeps before each call; fail: {target: (rank, error, message)} makes every
        call on that rank raise the builtin exception `error`(message); target "module.attr" or "module:Class.attr"."""
        self.log = str(Path(cwd) / f".fault-log-{time.monotonic_ns()}")
        job = {"cwd": str(cwd), "args": list(args), "world": world, "port": free_port(), "slow": slow or {},
               "fsize": fsize, "fail": fail or {}, "log": self.log}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.pids = json.loads(self.proc.stdout.readline())["pids"]

    def wait(self) -> list[int]:
        return json.loads(self.proc.stdout.readline())["codes"]

    def output(self, rank: int = 0) -> str:
        p = Path(f"{self.log}.{rank}")
        return p.read_text(errors="replace") if p.exists() else ""

    def run(self, cwd: Path, *args: str, **kw) -> tuple[list[int], str]:
        """Run to the end: (exit codes per rank, rank 0's output)."""
        self.start(cwd, *args, **kw)
        codes = self.wait()
        return codes, self.output()

    def kill(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_for(self, marker: str, count: int = 1, timeout: float = 300) -> bool:
        """Wait until rank 0's output holds `marker` `count` times (True) or the children ended first (False)."""
        deadline = time.time() + timeout
        while self.output().count(marker) < count:
            if not all(_alive(p) for p in self.pids):
                return False
            assert time.time() < deadline, f"no {marker!r} in {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


SHUTDOWN_GRACE_S = 30.0
"""How long kill_and_rerun lets the other ranks end by themselves once one rank has exited."""


def kill_and_rerun(z: Zygote, cwd: Path, first: tuple[str, ...], rerun: tuple[str, ...], *, kills: int, rng,
                   marker: str, max_delay: float, max_count: int = 1, world: int = 1, slow: dict | None = None, after_kill=None,
                   restart=None) -> dict:
    """SIGKILL every rank `kills` times at random moments of the work (uniform in [0, max_delay] after
    the n-th `marker` of the run, n uniform in 1..max_count), each kill followed by `rerun`; a run that finishes before its kill is started again
    from scratch by `restart()` (if given) until all kills landed. Ends with an unkilled `rerun`."""
    landed, finished, args = 0, 0, first
    while landed < kills:
        z.start(cwd, *args, world=world, slow=slow)
        started = z.wait_for(marker, count=int(rng.integers(1, max_count + 1)))
        if started:
            time.sleep(rng.uniform(0, max_delay))
        if any(_alive(p) for p in z.pids) and not all(_alive(p) for p in z.pids):
            # A rank already ended: the run is finishing. Let the others end by themselves (a rank still alive
            # after the grace is stuck at shutdown, and its SIGKILL below fails the test).
            grace = time.time() + SHUTDOWN_GRACE_S
            while any(_alive(p) for p in z.pids) and time.time() < grace:
                time.sleep(0.05)
        alive = all(_alive(p) for p in z.pids)
        z.kill()
        codes = z.wait()
        if alive and any(c == -signal.SIGKILL for c in codes):
            landed += 1
            if after_kill is not None:
                after_kill()
            args = rerun
        else:
            assert all(c == 0 for c in codes), f"exit codes {codes}:\n{z.output()[-3000:]}"
            finished += 1
            if restart is not None:
                restart()
                args = first
    codes, out = z.run(cwd, *rerun, world=world, slow=slow)
    assert all(c == 0 for c in codes), f"exit codes {codes}:\n{out[-3000:]}"
    return {"kills": landed, "finished_early": finished}
