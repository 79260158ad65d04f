"""The whole lineage under DVC on a tiny configuration, in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_one_line_error


def sh(*args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_teacher):
    """A git+DVC copy of the repository whose params use the tiny teacher and two tiny students."""
    return tiny_repo(tmp_path_factory.mktemp("repo"), tiny_teacher)


def tiny_repo(root: Path, tiny_teacher: Path, **paths) -> Path:
    """Copy the repository's git files to `root` with tiny params (and `paths` overrides), as a git repo."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(seq_len=32, max_train_tokens=2048, max_validation_tokens=512)
    params["teacher"]["model"] = str(tiny_teacher)
    params["teacher_logits"].update(shard_size=8, batch_size=8)
    params["train"].update(batch_size=4, num_epochs=1.0, max_steps=4, eval_steps=2, save_steps=2, warmup_steps=1,
                           calibration_tokens=64)
    params["students"] = {"kd20": {"init": {"from_teacher": {"num_layers": 1}}, "alpha": 0.5},
                          "ce20": {"init": {"from_teacher": {"num_layers": 1}}, "alpha": 1.0}}
    params["paths"].update(paths)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny", cwd=root)
    return root


def test_repro_runs_the_lineage_then_does_nothing(repo):
    out = sh("dvc", "repro", cwd=repo)
    assert ran(out) == {"prepare", "teacher_logits", "train@kd20", "train@ce20", "evaluate"}
    metrics = json.loads((repo / "stages/evaluate/metrics.json").read_text())
    assert set(metrics) == {"teacher", "kd20", "ce20"}
    assert (repo / "stages/evaluate/chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "| teacher |" in (repo / "stages/evaluate/report.md").read_text()
    again = sh("dvc", "repro", cwd=repo)
    assert ran(again) == set(), again


def test_changing_one_student_reruns_only_it_and_evaluate(repo):
    sh("dvc", "repro", cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["students"]["kd20"]["temperature"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo)
    assert ran(out) == {"train@kd20", "evaluate"}, out


def test_adding_a_student_reuses_the_store(repo):
    sh("dvc", "repro", cwd=repo)
    store_flags = (repo / "stages/teacher_logits/logits.zarr/zarr.json").read_bytes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["students"]["kd_t4"] = {"init": {"from_teacher": {"layers": [1]}}, "alpha": 0.3, "temperature": 4.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo)
    assert ran(out) == {"train@kd_t4", "evaluate"}, out
    assert (repo / "stages/teacher_logits/logits.zarr/zarr.json").read_bytes() == store_flags
    assert "kd_t4" in json.loads((repo / "stages/evaluate/metrics.json").read_text())


def test_metrics_plots_and_experiments(repo):
    sh("dvc", "repro", cwd=repo)
    shown = sh("dvc", "metrics", "show", cwd=repo)
    assert "perplexity" in shown and "kd20" in shown
    sh("dvc", "plots", "show", "-o", "plots_html", cwd=repo)
    assert (repo / "plots_html" / "index.html").is_file()
    # the overlay holds every student's curve, though dvc.yaml names none of them
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo))["data"]["stages/evaluate/curves.csv"]
    [plot] = plots
    rows = plot["content"]["data"]["values"]
    students = set(json.loads((repo / "stages/evaluate/metrics.json").read_text())) - {"teacher"}
    assert {r["student"] for r in rows} == students and len(students) >= 2
    assert plot["content"]["encoding"]["color"]["field"] == "student"
    assert "kd20" not in (repo / "dvc.yaml").read_text()
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "ran", cwd=repo)
    out = sh("dvc", "exp", "run", "-S", "students.kd20.alpha=0.8", cwd=repo)
    assert "train@kd20" in out and "teacher_logits" not in ran(out), out


# Imported by every Python process of the test's `dvc exp run` (through PYTHONPATH): once a student's step 2 is
# logged, its training waits until the test has looked at `dvc exp show`, so the look lands mid-run for sure.
HOLD_AFTER_STEP_2 = """
import os
if os.environ.get("HOLD_DIR"):
    import time
    from pathlib import Path
    from distill_pipe import metrics
    log_train = metrics.History.log_train
    def held(self, row):
        log_train(self, row)
        hold = Path(os.environ["HOLD_DIR"])
        if row["step"] == 2 and self.is_main:
            (hold / f"{self.folder.name}.waiting").touch()
            deadline = time.time() + 600
            while not (hold / "release").exists() and time.time() < deadline:
                time.sleep(0.05)
    metrics.History.log_train = held
"""


def test_exp_show_lists_a_students_step_metrics_while_it_trains(repo, tmp_path):
    """dvclive's files are the train stage's metrics and plots: during a `dvc exp run`, `dvc exp show` lists the
    running experiment with the student's step metrics, and `dvc plots show` its curves so far; after the run,
    the experiment's row keeps them beside the baseline's, so a sweep compares in one table."""
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline", "--allow-empty", cwd=repo)
    hooks, hold = tmp_path / "hooks", tmp_path / "hold"
    hooks.mkdir()
    hold.mkdir()
    (hooks / "sitecustomize.py").write_text(HOLD_AFTER_STEP_2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "HOLD_DIR": str(hold),
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(["dvc", "exp", "run", "-S", "students.kd20.alpha=0.6"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = "stages/dvclive/kd20/metrics.json"
    try:
        deadline = time.time() + 600
        while not (hold / "kd20.waiting").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.1)
        shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
        running = [e for row in shown for e in row.get("experiments") or []
                   if (e.get("executor") or {}).get("state") == "running"]
        assert len(running) == 1, shown
        data = running[0]["revs"][0]["data"]
        live = data["metrics"][metrics]["data"]
        assert live["step"] == 2 and live["train"]["tokens"] > 0 and live["train"]["loss"] > 0, live
        assert data["params"]["params.yaml"]["data"]["students"]["kd20"]["alpha"] == 0.6
        plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo))["data"]
        [loss] = plots["stages/dvclive/kd20/plots/metrics/train/loss.tsv"]
        assert [int(r["step"]) for r in loss["content"]["data"]["values"]] == [1, 2]
        assert proc.poll() is None, "the run ended before the test looked"
    finally:
        (hold / "release").touch()
        out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
    baseline = next(row for row in shown if row["rev"] != "workspace")
    [exp] = [e for e in baseline["experiments"] if e["revs"][0]["data"]["params"]["params.yaml"]["data"]["students"]
             ["kd20"]["alpha"] == 0.6]
    done = exp["revs"][0]["data"]["metrics"][metrics]["data"]
    assert done["step"] == 4 and done["best"]["step"] in (2, 4)
    assert done["eval"]["loss"] != baseline["data"]["metrics"][metrics]["data"]["eval"]["loss"]


def test_changing_the_codec_replaces_the_persisted_store(repo):
    sh("dvc", "repro", cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["teacher_logits"]["codec"] = "dense-u8"
    for student in params["students"].values():  # dense-u8 refuses T > 1 (its dropped tail)
        student["temperature"] = 1.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo)
    assert {"teacher_logits", "train@kd20", "evaluate"} <= ran(out), out
    info = json.loads((repo / "stages/teacher_logits/logits.zarr/zarr.json").read_text())["attributes"]
    assert info["codec"]["name"] == "dense-u8"
    teacher = json.loads((repo / "stages/evaluate/metrics.json").read_text())["teacher"]
    # the store drops tokens: the teacher's perplexity is not comparable; over the kept targets it is finite
    assert teacher["perplexity"] is None and teacher["perplexity_kept_targets"] < float("inf")


def test_store_shared_through_a_dvc_remote(repo, tmp_path):
    """docs/dvc.md's recipe: cache the store, `dvc push` it; a fresh clone `dvc pull`s it and trains students
    without running the teacher."""
    a = tmp_path / "a"
    shutil.copytree(repo, a, ignore=shutil.ignore_patterns("plots_html"))
    spec = yaml.safe_load((a / "dvc.yaml").read_text())
    # the store is no DVC output by default (its manifest is); the recipe adds it as a cached, persisted one
    spec["stages"]["teacher_logits"]["outs"].append({"${paths.logits}": {"persist": True}})
    (a / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sh("dvc", "repro", cwd=a)
    sh("dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=a)
    sh("dvc", "push", cwd=a)
    sh("git", "add", "-A", cwd=a)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "store cached and pushed", cwd=a)
    sh("git", "clone", "-q", str(a), str(tmp_path / "b"), cwd=tmp_path)
    b = tmp_path / "b"
    sh("dvc", "pull", cwd=b)
    assert (b / "stages/teacher_logits/logits.zarr/zarr.json").read_bytes() == \
        (a / "stages/teacher_logits/logits.zarr/zarr.json").read_bytes()
    out = sh("dvc", "repro", cwd=b)
    students = yaml.safe_load((b / "params.yaml").read_text())["students"]
    # the students retrain (their outputs are not cached); prepare and the teacher do not run
    assert ran(out) == {f"train@{name}" for name in students} | {"evaluate"}, out


MANIFEST = "stages/teacher_logits/manifest.json"
STORE = "stages/teacher_logits/logits.zarr"


def cli(*args, cwd) -> tuple[int, str]:
    """A distill-pipe command in its own process: (exit code, stdout+stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["distill-pipe", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_dvc_tracks_the_manifest_never_the_store(repo):
    sh("dvc", "repro", cwd=repo)
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    # the store is neither hashed as an output nor as any stage's dependency
    tracked = {e["path"] for st in stages.values() for e in st.get("deps", []) + st.get("outs", [])}
    assert not any("logits.zarr" in p for p in tracked), tracked
    assert [o["path"] for o in stages["teacher_logits"]["outs"]] == [MANIFEST]
    for name in ("train@kd20", "train@ce20", "evaluate"):
        assert MANIFEST in [d["path"] for d in stages[name]["deps"]]
    manifest = json.loads((repo / MANIFEST).read_text())
    info = json.loads((repo / STORE / "zarr.json").read_text())["attributes"]
    assert manifest["store"] == STORE and manifest["complete"] is True
    assert manifest["codec"] == info["codec"] and manifest["teacher"] == info["teacher"]
    assert manifest["data"] == {"fingerprint": info["data"]["fingerprint"]}
    assert {s: m["shards_done"] for s, m in manifest["splits"].items()} == \
        {s: m["num_shards"] for s, m in info["splits"].items()}
    # the manifest is committable (the store is git-ignored): a clone knows the store is complete
    ignored = lambda path: subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0  # noqa: E731
    assert ignored(STORE) and not ignored(MANIFEST)
    # `dvc status` does not read the store: bytes added inside it go unnoticed
    (repo / STORE / "padding").write_bytes(os.urandom(1 << 20))
    try:
        assert "up to date" in sh("dvc", "status", cwd=repo)
    finally:
        (repo / STORE / "padding").unlink()
    # a lost manifest reruns the teacher stage, which finds the store complete and writes the same manifest:
    # the students' dependency is unchanged, so they do not retrain
    before = (repo / MANIFEST).read_bytes()
    (repo / MANIFEST).unlink()
    out = sh("dvc", "repro", cwd=repo)
    assert ran(out) == {"teacher_logits"}, out
    assert "0 of" in out and (repo / MANIFEST).read_bytes() == before


def test_a_damaged_store_is_refused_then_finished_by_the_teacher_stage(repo, tmp_path):
    """DVC cannot see a store deleted or damaged behind a complete manifest: the students and evaluate refuse
    it in one line naming the rerun, and that rerun finishes it without retraining anyone."""
    from distill_pipe.store import open_store

    sh("dvc", "repro", cwd=repo)
    manifest = (repo / MANIFEST).read_bytes()
    store = open_store(repo / STORE, mode="r+")
    store.array("train", "done")[1] = 0  # one shard flagged unfinished
    assert "up to date" in sh("dvc", "status", cwd=repo)
    code, out = cli("train", "--student", "kd20", "--set", f"paths.train={tmp_path}", cwd=repo)
    assert_one_line_error(code, out, f"train shard 1 of {store.num_shards('train')} missing, though {MANIFEST} "
                                     "says it is complete")
    assert "dvc repro --force --single-item teacher_logits" in out
    out = sh("dvc", "repro", "--force", "--single-item", "teacher_logits", cwd=repo)
    assert ran(out) == {"teacher_logits"} and "1 of" in out, out
    assert open_store(repo / STORE).completed_shards("train") == set(range(store.num_shards("train")))
    assert (repo / MANIFEST).read_bytes() == manifest
    assert ran(sh("dvc", "repro", cwd=repo)) == set()

    shutil.rmtree(repo / STORE)
    code, out = cli("evaluate", cwd=repo)
    assert_one_line_error(code, out, f"{STORE} is missing, though {MANIFEST} says it is complete")
    out = sh("dvc", "repro", "--force", "--single-item", "teacher_logits", cwd=repo)
    assert ran(out) == {"teacher_logits"} and (repo / MANIFEST).read_bytes() == manifest
    assert ran(sh("dvc", "repro", cwd=repo)) == set()


def test_a_store_rewritten_outside_dvc_is_refused(repo, tmp_path):
    """A store replaced by hand (here: another codec's store moved into its place) no longer matches the
    manifest the students depend on."""
    sh("dvc", "repro", cwd=repo)
    other = tmp_path / "other.zarr"
    # dense-bf16: a codec the module's repo never uses (an earlier test leaves it on dense-u8)
    code, out = cli("teacher-logits", "--set", f"paths.logits={other}", "--set", "teacher_logits.codec=dense-bf16",
                    "--set", f"paths.manifest={tmp_path / 'other.json'}", cwd=repo)
    assert code == 0, out
    shutil.move(repo / STORE, tmp_path / "kept.zarr")
    shutil.move(other, repo / STORE)
    try:
        code, out = cli("train", "--student", "kd20", "--set", f"paths.train={tmp_path / 'train'}", cwd=repo)
        assert_one_line_error(code, out, f"{STORE} differs from {MANIFEST} in codec")
    finally:
        shutil.rmtree(repo / STORE)
        shutil.move(tmp_path / "kept.zarr", repo / STORE)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3-compatible endpoint for this test only: moto's server on 127.0.0.1, a port the OS picks.
    The AWS_* variables reach every process the test starts (s3fs reads AWS_ENDPOINT_URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(var, value)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_repro_with_the_store_on_s3(tmp_path, tiny_teacher, s3_endpoint):
    """docs/dvc.md's object-storage recipe: paths.logits is an s3:// URL; `dvc repro` runs the whole lineage
    with the store in the bucket and only its manifest on disk, then does nothing; the store read back over
    S3 holds exactly what a local run writes."""
    import fsspec
    import torch

    from distill_pipe.store import open_store

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("distill")
    url = "s3://distill/run/logits.zarr"
    (tmp_path / "repo").mkdir()
    root = tiny_repo(tmp_path / "repo", tiny_teacher, logits=url)
    out = sh("dvc", "repro", cwd=root)
    assert ran(out) == {"prepare", "teacher_logits", "train@kd20", "train@ce20", "evaluate"}, out
    assert not (root / STORE).exists()
    keys = fs.find("distill/run/logits.zarr")
    assert "distill/run/logits.zarr/zarr.json" in keys and any("/train/" in k and "/c/" in k for k in keys), keys
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["store"] == url and manifest["complete"] is True
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert not any("distill/run" in e["path"] for st in stages.values() for e in st.get("deps", []) + st.get("outs", []))
    assert json.loads((root / "stages/train/kd20/metrics.json").read_text())["data"]["path"] == url
    metrics = json.loads((root / "stages/evaluate/metrics.json").read_text())
    assert set(metrics) == {"teacher", "kd20", "ce20"} and metrics["teacher"]["perplexity"] < float("inf")
    assert ran(sh("dvc", "repro", cwd=root)) == set()
    code, out = cli("inspect", url, "--verify", cwd=root)
    assert code == 0 and "verify      ok" in out, out

    local = tmp_path / "local.zarr"
    code, out = cli("teacher-logits", "--set", f"paths.logits={local}", "--set",
                    f"paths.manifest={tmp_path / 'local.json'}", cwd=root)
    assert code == 0, out
    remote, here = open_store(url), open_store(local)
    for split in here.splits:
        idx = list(range(here.num_sequences(split)))
        a, b = remote.teacher_batch(split, idx).payload, here.teacher_batch(split, idx).payload
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in json.loads((tmp_path / "local.json").read_text()).items() if k != "store"} == \
        {k: v for k, v in manifest.items() if k != "store"}


def _imports(path: Path) -> set[str]:
    """distill_pipe modules a file imports (anywhere in it, lazily included), as dotted names."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill_pipe"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distill_pipe")}
    return out


def _module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _dep_paths(entry: str) -> set[str]:
    """dvc.yaml dep spelling of what a stage's command runs: cli.py itself (whose stage imports are inside
    each command), config (every command reads params) and everything `entry` imports transitively."""
    seen, todo = {"distill_pipe.cli"}, [entry, "distill_pipe.config"]
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        todo += _imports(_module_file(name))
    deps = set()
    for name in seen - {"distill_pipe"}:
        if name.startswith("distill_pipe.store"):
            deps.add("distill_pipe/store")
        else:
            deps.add(str(_module_file(name).relative_to(REPO)))
    return deps


@pytest.mark.parametrize("stage, entry", [("prepare", "distill_pipe.data"), ("teacher_logits", "distill_pipe.teacher"),
                                          ("train", "distill_pipe.train"), ("evaluate", "distill_pipe.evaluate")])
def test_stage_deps_are_the_modules_it_imports(stage, entry):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    deps = spec["do"]["deps"] if "do" in spec else spec["deps"]
    listed = {d for d in deps if d.startswith("distill_pipe")}
    assert listed == _dep_paths(entry)
