"""The run folder is never corrupted or silently wrong: one owner at a time, finished runs left alone, resumes
checked against the data, weights never overwritten unasked, and nonsense refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.tiny import make_folder, tiny_overrides
from vitlab.cli import main
from vitlab.train import RunFolderBusy, load_config, train
from vitlab.train.rundir import RunFolder


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data")


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _sets(**extra) -> list[str]:
    return [a for s in tiny_overrides(**extra) for a in ("--set", s)]


def test_a_held_folder_refuses_a_second_run_naming_the_holder(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = RunFolder(run)
    holder.claim(resume=False, overwrite=False)
    holder.start(resume=False, overwrite=False)  # writes who holds it
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train(load_config(None, tiny_overrides(epochs=1)), data, run)
        assert main(["train", "--config", "demo", "--data", str(data), "--out", str(run), *_sets(epochs=1)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "Traceback" not in err[0]
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # the refused runs wrote nothing
    finally:
        holder.release()
    result = train(load_config(None, tiny_overrides(epochs=1)), data, run)  # released: the folder is free
    assert result["step"] == 6


def test_resume_of_a_finished_run_says_so_and_changes_no_file(data, tmp_path, capsys):
    cfg = load_config("demo", tiny_overrides(epochs=1))  # as the command line below builds it
    first = train(cfg, data, tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    again = train(cfg, data, tmp_path / "run", resume=True)
    assert again["already_finished"] and again["step"] == first["step"] == 6 and again["top1"] == first["top1"]
    assert _snapshot(tmp_path / "run") == before
    assert main(["train", "--config", "demo", "--data", str(data), "--out", str(tmp_path / "run"), "--resume",
                 *_sets(epochs=1)]) == 0
    assert "is a finished run (6 steps); nothing to resume, no file changed" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == before
    final = (tmp_path / "run" / "final.json").read_text()
    assert "NaN" not in final and json.loads(final)["train_loss"] == pytest.approx(first["train_loss"])


def test_resume_with_other_training_data_is_refused(data, tmp_path):
    cfg = load_config(None, tiny_overrides(steps=3))
    train(cfg.replace(steps=3), data, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["data"] == {"classes": ["c0", "c1", "c2"], "files": 48}
    (tmp_path / "run" / "final.json").unlink()  # as if stopped before the end
    shutil.copy(data / "train" / "c0" / "000.png", data / "train" / "c0" / "extra.png")
    with pytest.raises(ValueError, match="different training data .* image files: checkpoint 48 vs now 49"):
        train(cfg, data, tmp_path / "run", resume=True)
    (data / "train" / "c0" / "extra.png").unlink()
    (data / "train" / "c2").rename(data / "train" / "c9")
    with pytest.raises(ValueError, match=r"classes: checkpoint 3 \(c0, c1, c2\) vs now 3 \(c0, c1, c9\)"):
        train(cfg, data, tmp_path / "run", resume=True)


def test_existing_weights_are_replaced_only_when_asked(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"someone's weights")
    cfg = load_config(None, tiny_overrides(epochs=1))
    with pytest.raises(FileExistsError, match="model.safetensors; pass --overwrite"):
        train(cfg, data, run)
    assert (run / "model.safetensors").read_bytes() == b"someone's weights"
    train(cfg, data, run, overwrite=True)
    assert (run / "model.safetensors").read_bytes()[:8] != b"someone'"
    # A finished run: a new run needs --overwrite too, and starts clean (no stale final.json marks it finished).
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite"):
        train(cfg, data, run)
    result = train(cfg.replace(steps=2), data, run, overwrite=True)
    assert result["step"] == 2 and json.loads((run / "final.json").read_text())["step"] == 2


@pytest.mark.parametrize("case", ["one-class", "empty-class", "all-unreadable", "few-readable"])
def test_data_that_cannot_train_is_refused_before_anything_is_written(tmp_path, case):
    data = make_folder(tmp_path / "data")
    if case == "one-class":
        for c in ("c1", "c2"):
            shutil.rmtree(data / "train" / c)
        match = r"one class folder \(c0\); a classifier needs at least two classes"
    elif case == "empty-class":
        for f in (data / "train" / "c1").iterdir():
            f.unlink()
        match = "class folder.s. without images: c1"
    else:
        keep = 0 if case == "all-unreadable" else 5
        for i, f in enumerate(sorted((data / "train").rglob("*.png"))):
            if i >= keep:
                f.write_bytes(b"broken")
        match = (r"no training images: all 48 files are unreadable \(first: .*c0/000.png: " if keep == 0 else
                 r"5 training images are fewer than one batch \(batch_size=8\); 43 unreadable file.s. skipped")
    with pytest.raises(ValueError, match=match):
        train(load_config(None, tiny_overrides(epochs=1)), data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nonsense_settings_are_one_line_errors(data, tmp_path, capsys):
    for lr in ("0", "-1"):
        assert main(["train", "--config", "demo", "--data", str(data), "--out", str(tmp_path / "run"),
                     *_sets(), "--set", f"lr={lr}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lr must be positive" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    for out, words in ((tmp_path / "file", "is a file; expected a folder"),
                       (tmp_path / "file" / "run", "is a file"),
                       (Path("/sys/vitlab-test-run"), "cannot write in /sys")):
        assert main(["train", "--config", "demo", "--data", str(data), "--out", str(out), *_sets()]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["train", "--config", "demo", "--data", str(data), "--out", str(locked / "run"), *_sets()]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
