"""End-to-end in subprocesses: SIGTERM saves and exits, SIGKILL + --resume is bit-exact, 2 DDP processes equal 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.tiny import make_folder, tiny_overrides
from vitlab.train import load_config, train


def _cli(data: Path, out: Path, sets: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "vitlab", "train", "--config", "demo", "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def _start_and_signal(cmd: list[str], run: Path, at_step: int, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while _last_step(run) < at_step:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {at_step}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("run too slow to reach the signal step")
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# Stochastic depth and dropout on, checkpoints every 7 steps, EMA on: everything a resume must restore.
SETS = tiny_overrides(epochs=15, checkpoint_every=7, ema_decay=0.9, mixup=0.4, cutmix=1.0,
                      **{"model_overrides.drop_path": 0.1, "model_overrides.dropout": 0.1})


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
    data = make_folder(tmp_path / "data")
    reference = train(load_config("demo", SETS), data, tmp_path / "ref")
    assert reference["step"] == 90

    run = tmp_path / "run"
    term = _start_and_signal(_cli(data, run, SETS), run, at_step=20, sig=signal.SIGTERM)
    assert term.returncode == 0, term.stderr.read()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 20 <= state["step"] < 90 and state["step"] == _last_step(run)
    assert not (run / "model.safetensors").exists()

    killed = _start_and_signal(_cli(data, run, SETS, "--resume"), run, at_step=state["step"] + 20, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    # The kill may land anywhere: the last good checkpoint is intact and loads.
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] % 7 == 0

    done = subprocess.run(_cli(data, run, SETS, "--resume", "--json"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout.strip().splitlines()[-1])
    assert resumed["step"] == 90
    a, b = _weights(tmp_path / "ref" / "model.safetensors"), _weights(run / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert resumed["top1"] == reference["top1"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(line)]
    assert steps == list(range(1, 91))  # the log was rewound to each checkpoint: no step twice


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, strategy):
    data = make_folder(tmp_path / "data")
    # Stochastic depth off: its masks are drawn per process, so they cannot match a single process's.
    sets = tiny_overrides(epochs=2, batch_size=8, mixup=0.4, cutmix=1.0, randaugment_n=2,
                          **{"model_overrides.drop_path": 0.0})
    single = train(load_config("demo", sets), data, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitlab",
           "train", "--config", "demo", "--data", str(data), "--out", str(tmp_path / "two"), "--json",
           "--set", f"distributed={strategy}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])
    assert two["world_size"] == 2 and two["step"] == single["step"] == 12
    a, b = _weights(tmp_path / "one" / "model.safetensors"), _weights(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    assert two["top1"] == single["top1"]


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_stop_and_resumes_bit_exactly(tmp_path):
    """SIGINT (Ctrl-C) is handled as SIGTERM: one line, a checkpoint at the step it stopped, exit code 0, no
    traceback; --resume then ends with the weights of an uninterrupted run."""
    data = make_folder(tmp_path / "data")
    sets = tiny_overrides(epochs=8, checkpoint_every=100, **{"model_overrides.drop_path": 0.1})
    reference = train(load_config("demo", sets), data, tmp_path / "ref")
    run = tmp_path / "run"
    proc = _start_and_signal(_cli(data, run, sets), run, at_step=15, sig=signal.SIGINT)
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 15 <= state["step"] < 48 and state["step"] == _last_step(run)  # checkpointed at the stop, not at 100
    assert f"stopped by SIGINT at step {state['step']}; checkpoint saved" in err
    assert not (run / "model.safetensors").exists()
    done = subprocess.run(_cli(data, run, sets, "--resume", "--json"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == reference["step"] == 48
    a, b = _weights(tmp_path / "ref" / "model.safetensors"), _weights(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_running_training_owns_its_folder_until_it_dies(tmp_path):
    """A second run into a folder being trained exits with one line naming the first (its pid); killing the
    first (SIGKILL: no cleanup runs) frees the folder at once, and --resume continues it."""
    data = make_folder(tmp_path / "data")
    sets = tiny_overrides(epochs=200, checkpoint_every=5)
    run = tmp_path / "run"
    first = subprocess.Popen(_cli(data, run, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while _last_step(run) < 6:
            assert first.poll() is None and time.time() < deadline, "the first run did not get going"
            time.sleep(0.01)
        second = subprocess.run(_cli(data, run, sets), capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another training run (pid {first.pid} on " in lines[0], lines
        config = (run / "config.json").read_text()
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (run / "config.json").read_text() == config  # the refused run changed nothing
    resumed = subprocess.run(_cli(data, run, tiny_overrides(epochs=200, checkpoint_every=5, steps=12), "--resume"),
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 2 and "different config: steps" in resumed.stderr  # the lock was free


BUDGET_SCRIPT = """
import json, os, sys, time

rank = int(os.environ["RANK"])
if rank == 1:  # this process's clock runs five times too fast: left to itself it would stop at a fifth
    real = time.perf_counter
    origin = real()
    time.perf_counter = lambda: origin + 5.0 * (real() - origin)
from vitlab.train import load_config, train

data, out, ranks, sets = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
result = train(load_config("demo", sets), data, out)
with open(os.path.join(ranks, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_a_budget_on_two_processes_follows_rank_0s_clock(tmp_path):
    """Under torchrun a wall-clock budget is read on rank 0 and shared: with rank 1's clock running five times
    too fast, both ranks still stop at the same step, when rank 0's budget is spent, and the last step's
    learning rate is the schedule's at the length the run ended with."""
    from vitlab.train import lr_at

    data = make_folder(tmp_path / "data")
    (tmp_path / "ranks").mkdir()
    (tmp_path / "budget_run.py").write_text(BUDGET_SCRIPT)
    budget_s = 4.0
    sets = tiny_overrides(epochs=10000, batch_size=8, budget_minutes=budget_s / 60, warmup_steps=5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "budget_run.py"), str(data), str(tmp_path / "run"), str(tmp_path / "ranks"), json.dumps(sets)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert (r0["step"], r0["total_steps"]) == (r1["step"], r1["total_steps"])
    assert 40 < r0["step"] < 10000 * 6  # ran on the budget, not to the epoch bound, and well past the first steps
    assert budget_s * 0.9 <= r0["train_seconds"] <= budget_s * 1.5  # rank 0's budget ended the run
    assert r1["train_seconds"] > 3 * budget_s  # by its own clock rank 1 ran far past the budget: it followed rank 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "split" not in r][-1]
    assert last["step"] == r0["step"]
    assert last["lr"] == pytest.approx(lr_at(r0["step"] - 1, total_steps=r0["total_steps"], peak=0.001,
                                             warmup_steps=5, kind="cosine"))
