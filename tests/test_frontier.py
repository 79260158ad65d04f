"""benchmarks/frontier.py's paired multi-seed statistics against hand-computed mean and SE, the seeds rule
(--seeds wins, else the config's train.seed) and its bad input."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("frontier_bench", ROOT / "benchmarks" / "frontier.py")
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def test_paired_stats_by_hand():
    # diffs 1, 2, 4: mean 7/3, sample sd sqrt(7/3), SE sqrt(7/3) / sqrt(3) = sqrt(7) / 3
    st = frontier.paired_stats([1.0, 2.0, 4.0])
    assert st["n"] == 3
    assert st["mean"] == pytest.approx(7 / 3, abs=1e-12)
    assert st["se"] == pytest.approx(math.sqrt(7) / 3, abs=1e-12)
    one = frontier.paired_stats([2.5])
    assert one["mean"] == 2.5 and math.isnan(one["se"])


def row(setting, seed, ppl, kl, top1):
    return {"setting": setting, "seed": seed, "perplexity": ppl, "kl_to_teacher": kl, "top1_agreement": top1}


def test_paired_summary_pairs_by_seed():
    ref = [row("dense-bf16", 0, 10.0, 1.0, 0.50), row("dense-bf16", 1, 12.0, 0.8, 0.60),
           row("dense-bf16", 2, 11.0, 0.9, 0.55)]
    # listed in another seed order than the reference: pairing goes by seed, not by position
    other = [row("x", 2, 11.55, 1.2, 0.55), row("x", 0, 10.5, 1.1, 0.48), row("x", 1, 12.0, 0.8, 0.61),
             {"setting": "x", "seed": 3, "refused": "no reference at seed 3 either"}]
    s = frontier.paired_summary(ref + other)["x"]
    assert s["seeds"] == [2, 0, 1]
    # ppl diffs 5%, 5%, 0%: mean 10/3, SE 5/3
    assert s["ppl_pct"] == pytest.approx([5.0, 5.0, 0.0], abs=1e-9)
    assert s["ppl_pct_stats"]["mean"] == pytest.approx(10 / 3, abs=1e-9)
    assert s["ppl_pct_stats"]["se"] == pytest.approx(5 / 3, abs=1e-9)
    # KL diffs 0.3, 0.1, 0: mean 0.4 / 3, SE sqrt(7) / 30; relative 100/3 %, 10 %, 0 %
    assert s["kl_abs_stats"]["mean"] == pytest.approx(0.4 / 3, abs=1e-12)
    assert s["kl_abs_stats"]["se"] == pytest.approx(math.sqrt(7) / 30, abs=1e-12)
    assert s["kl_pct"] == pytest.approx([100 / 3, 10.0, 0.0], abs=1e-9)
    assert s["top1_abs"] == pytest.approx([0.0, -0.02, 0.01], abs=1e-12)
    assert frontier.paired_summary(ref)["dense-bf16"]["ppl_pct_stats"]["mean"] == 0.0


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["frontier.py", *argv])
    frontier.main()


def test_seeds_rule(monkeypatch, caplog, tmp_path):
    caplog.set_level("INFO", logger="frontier")
    run_main(monkeypatch, "--dry-run", "--out", str(tmp_path), "--set", "train.seed=7")
    assert "seeds [7]" in caplog.text
    caplog.clear()
    run_main(monkeypatch, "--dry-run", "--out", str(tmp_path), "--set", "train.seed=7", "--seeds", "0,1,2",
             "--settings", "headtail")
    assert "seeds [0, 1, 2]; settings: dense-bf16, headtail" in caplog.text
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,a"], "--seeds '0,a' is not a comma-separated list of integers"),
    (["--seeds", "1,1"], "--seeds '1,1' needs distinct integers"),
    (["--settings", "topk k=7"], "unknown --settings ['topk k=7']"),
    (["--set", "train.seed=x"], "train.seed"),
])
def test_bad_input(monkeypatch, tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--dry-run", "--out", str(tmp_path), *argv)
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_report_table_rows_match_its_header(tmp_path):
    import types

    fmt = {f"d={d},V={v}": 1 for d, v in frontier.SHAPES}
    results = [{**row(name, seed, 20.0 + seed + k, 1.0 + k / 10, 0.5), "bytes_per_token": 10.0 ** (k + 1),
                "format_bytes": fmt, "target_tv": 0.1, "targets": 255}
               for k, name in enumerate(["dense-bf16", "headtail"]) for seed in (0, 1)]
    results.append({"setting": "dense-u8", "seed": 0, "bytes_per_token": 9e3, "format_bytes": fmt, "target_tv": 0.2,
                    "refused": "T > 1"})
    results.append({**results[-1], "setting": "headtail", "seed": 2, "bytes_per_token": 100.0})
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(seq_len=256), teacher=types.SimpleNamespace(model="t"))
    tc = types.SimpleNamespace(max_steps=4, num_epochs=3, alpha=0.5, temperature=2.0, learning_rate=6e-4,
                               batch_size=1, gradient_accumulation_steps=1)
    args = types.SimpleNamespace(student="kd20", preset="cpu", tokens="demo")
    report = frontier.write_outputs(tmp_path, results, {"perplexity": 18.0, "targets": 255}, cfg, tc, args, [0, 1],
                                    "cpu", 64, 8, 1.0)
    table = [ln for ln in report.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 3 + 1  # header, separator, three settings, headtail's refused seed
    assert {ln.count("|") for ln in table} == {table[0].count("|")}
    # 21/20, 22/21: +5.00 %, +4.76 %; mean 4.88, SE |5.00 - 4.76| / 2 = 0.12
    assert "| headtail |" in report and "+4.88 ± 0.12 | +5.00, +4.76 |" in report
    assert (tmp_path / "frontier.json").is_file()
