"""The eval CLI: results files, resume after a kill, clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_runtime.cli import main


def run_cli(*args: str) -> int:
    return main(list(args))


def test_eval_writes_results(tmp_path, capsys):
    out = tmp_path / "ev"
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "4", "--seed", "7", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "success 100.0%" in printed and "loop" in printed
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 4
    info = json.loads((out / "eval_info.json").read_text())
    assert [e["seed"] for e in info["per_episode"]] == [7, 8, 9, 10]
    agg = info["aggregated"]
    assert agg["episodes"] == 4 and agg["success_pct"] == 100.0
    assert agg["success_ci95"][1] == 100.0 and agg["success_ci95"][0] < 60
    assert agg["loop_hz"] > 0 and agg["inference_ms_p50"] is not None and agg["deadline_misses"] == 0
    assert set(info["per_task"]) == {"reach"}
    assert info["missing_episodes"] == []


def test_eval_policy_options_reach_the_policy(tmp_path):
    out = tmp_path / "ev"
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "diffusion:diffusion_lift", "--sampler", "step2",
                   "--episodes", "1", "--max-steps", "24", "--policy-options", '{"stall_eps": 1e9}',
                   "--out", str(out)) == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert info["aggregated"]["mean_perturbed"] > 0  # every warm start counted as a stall: the option arrived
    assert info["config"]["policy_options"] == {"stall_eps": 1e9}


def test_eval_paced_counts_deadlines(tmp_path):
    out = tmp_path / "ev"
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--paced", "--out", str(out)) == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert info["config"]["loop"]["clock"] == "sim"
    assert info["aggregated"]["deadline_misses"] == 0  # the expert answers in well under one period


@pytest.mark.parametrize("args, needle", [
    (("eval", "--env", "robosuite:Nope"), "unknown env 'robosuite:Nope'; valid: robosuite:Lift"),
    (("eval", "--env", "libero:libero_object/12"), "unknown env"),
    (("eval", "--env", "dummy:reach", "--policy", "magic"), "unknown policy 'magic'; valid: scripted"),
    (("eval", "--env", "dummy:reach", "--policy", "diffusion:/no/such/dir"), "checkpoint '/no/such/dir' not found"),
    (("eval", "--env", "dummy:reach", "--policy", "scripted", "--mode", "async"), "--mode async needs a paced clock"),
    (("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "0"), "--episodes must be >= 1"),
    (("eval", "--env", "dummy:reach", "--policy", "scripted", "--accel", "specprune"), "does not apply to the scripted expert"),
    (("train", "--policy", "diffusion", "--data", "/no/such/demos", "--out", "/tmp/x"), "does not exist"),
    (("eval", "--env", "dummy:reach", "--policy-options", "{bad"), "--policy-options is not valid JSON"),
    (("eval", "--env", "dummy:reach", "--policy-options", "[1]"), "--policy-options must be a JSON object"),
    (("eval", "--env", "dummy:reach", "--policy-options", '{"sigmaa": 1}'), "unknown diffusion sampler options"),
])
def test_bad_input_one_line_error(tmp_path, capsys, args, needle):
    rc = run_cli(*args, *(() if args[0] != "eval" else ("--out", str(tmp_path / "o"))))
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_existing_results_are_never_overwritten(tmp_path, capsys):
    out = tmp_path / "ev"
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--out", str(out)) == 0
    before = (out / "episodes.jsonl").read_text()
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--out", str(out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "episodes.jsonl").read_text() == before
    # resuming with a different configuration is refused too
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--out", str(out), "--resume", "--paced") == 2
    assert "different configuration" in capsys.readouterr().err


def test_resume_after_torn_write(tmp_path):
    out = tmp_path / "ev"
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "3", "--out", str(out)) == 0
    lines = (out / "episodes.jsonl").read_text().splitlines()
    # simulate a kill during the third episode's write: a torn line
    (out / "episodes.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    assert run_cli("eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "3", "--out", str(out), "--resume") == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert [e["seed"] for e in info["per_episode"]] == [0, 1, 2]
    assert info["aggregated"]["episodes"] == 3


SLOW_EVAL = Path(__file__).with_name("slow_eval.py")


def test_resume_after_kill(tmp_path):
    out = tmp_path / "ev"
    args = [sys.executable, str(SLOW_EVAL), "eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "30", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = out / "episodes.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    done_before = len([ln for ln in jsonl.read_text().splitlines() if ln.strip()])
    assert 3 <= done_before < 30, "the kill must land mid-run"
    assert not (out / "eval_info.json").exists()
    rc = subprocess.run(args + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120).returncode
    assert rc == 0
    recs = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 30  # every episode exactly once, nothing re-run
    info = json.loads((out / "eval_info.json").read_text())
    assert info["aggregated"]["episodes"] == 30


def test_list_shows_envs_and_policies(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    assert "robosuite:Lift" in out and "libero:libero_object" in out and "scripted" in out


def test_module_entry_point():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "vla_runtime.cli", "eval", "--env", "bogus"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and "unknown env" in r.stderr
    assert Path(sys.executable).exists()
