"""Image folders count every real file once: links resolved, a folder link below a class (a loop back to an
ancestor, or a way out of the dataset) skipped with one warning naming it, class folders that are links (how the
studies' subsets share files) followed."""

from __future__ import annotations

import logging
import os

import pytest

from tests.train.tiny import make_folder
from vitlab.cli import main
from vitlab.data.folder import empty_classes, image_files, scan


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data")  # 3 classes, 16 train and 4 val images each


def test_a_loop_is_skipped_with_one_warning_naming_it(data, caplog):
    val = data / "val"
    os.symlink(".", val / "c1" / "again")  # `ln -s . val/c1/again`: c1 inside itself, without end
    with caplog.at_level(logging.WARNING):
        samples, classes = scan(val)
        scan(val)  # scanned again (a run does): no second warning
    assert len(samples) == 12 and [label for _, label in samples].count(1) == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{val / 'c1' / 'again'}: skipped a link to a folder (a loop: it points back to "
                        f"{os.path.realpath(val / 'c1')})"]


def test_links_out_of_the_root_and_duplicates_count_once(data, tmp_path, caplog):
    val = data / "val"
    elsewhere = make_folder(tmp_path / "other") / "val" / "c0"
    os.symlink(elsewhere, val / "c0" / "more")  # a folder outside the dataset
    os.symlink(val / "c0", val / "c2" / "c0-again")  # a folder of the dataset, under another class
    os.symlink(val / "c0" / "000.png", val / "c1" / "dup.png")  # a file already counted under c0
    with caplog.at_level(logging.WARNING):
        samples, _ = scan(val)
    assert len(samples) == 12  # 4 real images per class, nothing twice, nothing from outside
    text = caplog.text
    assert f"{val / 'c0' / 'more'}: skipped a link to a folder (it points out of {val}, to " in text
    assert f"{val / 'c2' / 'c0-again'}: skipped a link to a folder (its images are read where it points" in text
    assert f"skipped 1 link(s) to image files already counted (first: {val / 'c1' / 'dup.png'})" in text


def test_linked_class_folders_and_files_are_followed(data, tmp_path):
    subset = tmp_path / "subset" / "train"
    subset.mkdir(parents=True)
    os.symlink((data / "train" / "c0").resolve(), subset / "c0")  # a class folder that is a link
    (subset / "c1").mkdir()
    for name in ("000.png", "001.png"):
        os.symlink((data / "train" / "c1" / name).resolve(), subset / "c1" / name)  # file links
    samples, classes = scan(subset)
    assert classes == ["c0", "c1"] and [label for _, label in samples] == [0] * 16 + [1] * 2
    assert samples[16][0] == str(subset / "c1" / "000.png")  # the path as walked, not the link's target


def test_order_is_imagefolders(data):
    (data / "train" / "c0" / "sub").mkdir()
    (data / "train" / "c0" / "sub" / "a.png").write_bytes((data / "train" / "c0" / "000.png").read_bytes())
    (data / "train" / "c0" / "Z.JPG").write_bytes(b"upper-case extension counts")
    from torchvision.datasets.folder import make_dataset

    from vitlab.data.images import IMG_EXTENSIONS

    ours = image_files(data / "train" / "c0")
    theirs = [p for p, _ in make_dataset(str(data / "train"), {"c0": 0}, extensions=IMG_EXTENSIONS)]
    assert ours == theirs and len(ours) == 18


def test_empty_classes_are_named(data):
    for f in (data / "train" / "c2").iterdir():
        f.unlink()
    samples, classes = scan(data / "train")
    assert empty_classes(samples, classes) == ["c2"]


def test_eval_and_predict_count_a_looped_folder_once(data, tmp_path, capsys):
    import vitlab

    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    vitlab.save(model, tmp_path / "m.safetensors", labels=["c0", "c1", "c2"])
    os.symlink(".", data / "val" / "c2" / "again")
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(data), "--json", "--precision", "fp32",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert '"n": 12' in out
    assert main(["predict", str(tmp_path / "m.safetensors"), str(data / "val" / "c2"), "--json"]) == 0
    assert len(__import__("json").loads(capsys.readouterr().out)) == 4
