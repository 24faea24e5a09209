"""Every command reports a wrong or unwritable output place, and a bad input, in one line with exit code 2
before doing any work; a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

import vitlab
from tests.train.tiny import make_folder
from vitlab.cli import main
from vitlab.cli.common import UsageError, output_dir, output_file

UNWRITABLE = Path("/sys/vitlab-test")  # not writable even for root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    return vitlab.save(model, root / "m.safetensors", labels=["c0", "c1", "c2"])


def _one_line_error(capsys, rc: int, *words: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_output_places(tmp_path):
    (tmp_path / "f").write_text("x")
    assert output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert output_file(tmp_path / "a.json") == tmp_path / "a.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the write probe is gone
    for check, path, words in [(output_dir, tmp_path / "f", "is a file; expected a folder"),
                               (output_dir, tmp_path / "f" / "run", f"cannot be created: {tmp_path / 'f'} is a file"),
                               (output_file, tmp_path, "is a folder; expected a file path"),
                               (output_file, tmp_path / "f" / "a.json", "is a file, not a folder"),
                               (output_dir, UNWRITABLE / "run", "cannot write in /sys"),
                               (output_file, UNWRITABLE / "a.json", "cannot write in /sys")]:
        with pytest.raises(UsageError, match=words):
            check(path, "--out")


def test_eval_checks_its_out_before_evaluating(checkpoint, tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    _one_line_error(capsys, main(["eval", str(checkpoint), "--data", str(data), "--out", str(UNWRITABLE)]),
                    "vitlab eval: --out /sys/vitlab-test: cannot write in /sys")
    _one_line_error(capsys, main(["eval", str(checkpoint), "--data", str(tmp_path / "none")]), "not found")


def test_inspect_convert_export_fewshot_plot_bench_check_their_outputs(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    _one_line_error(capsys, main(["inspect", str(checkpoint), "--out", str(tmp_path / "file")]),
                    "vitlab inspect: --out", "is a file")
    _one_line_error(capsys, main(["inspect", str(checkpoint), "--out", str(UNWRITABLE)]), "cannot write in")
    _one_line_error(capsys, main(["convert", str(checkpoint), str(tmp_path / "dir"), "-q"]),
                    "vitlab convert: destination", "is a folder")
    _one_line_error(capsys, main(["convert", str(checkpoint), str(tmp_path / "file"), "--to", "hf", "-q"]),
                    "is a file; expected a folder")
    assert (tmp_path / "file").read_text() == "x"  # nothing replaced
    _one_line_error(capsys, main(["export", str(checkpoint), "--to", "onnx", "--out", str(tmp_path / "dir")]),
                    "must end in .onnx")
    _one_line_error(capsys, main(["fewshot", str(checkpoint), "--data", str(tmp_path), "--out",
                                  str(tmp_path / "dir")]), "vitlab fewshot: --out", "is a folder")
    _one_line_error(capsys, main(["plot", str(tmp_path), "--out", str(tmp_path / "dir")]), "is a folder")
    _one_line_error(capsys, main(["bench", "--out", str(UNWRITABLE / "b.json")]), "vitlab bench: --out")


def test_predict_on_an_empty_folder_is_an_error(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, main(["predict", str(checkpoint), str(tmp_path / "empty")]),
                    f"vitlab predict: {tmp_path / 'empty'}: no image files")


def test_unreadable_checkpoint_is_named_by_every_loading_command(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    data = make_folder(tmp_path / "data")
    for argv in (["eval", str(bad), "--data", str(data)], ["predict", str(bad), str(data / "val")],
                 ["fewshot", str(bad), "--data", str(data)], ["inspect", str(bad), "--out", str(tmp_path / "o")]):
        _one_line_error(capsys, main(argv), f"vitlab {argv[0]}: cannot load {bad}")


def test_a_bug_keeps_its_traceback(checkpoint, tmp_path, monkeypatch):
    import vitlab.train.inference

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(vitlab.train.inference, "predict", broken)
    with pytest.raises(ZeroDivisionError):
        main(["predict", str(checkpoint), str(make_folder(tmp_path / "d") / "val")])
