"""Nested class-balanced subsets: nested, balanced, reproducible, the same for every model, materialised as links."""

from __future__ import annotations

import os

import pytest

from vitlab.study.subsets import class_files, file_digest, materialise_subsets, nested_subsets

FILES = {c: [f"{c}/{i:03d}.jpg" for i in range(n)] for c, n in (("cat", 40), ("dog", 40), ("frog", 40))}


def test_nested_and_balanced() -> None:
    subsets = nested_subsets(FILES, [0.05, 0.25, 0.5, 1.0], seed=3)
    sizes = {f: len(v) for f, v in subsets.items()}
    assert sizes == {0.05: 6, 0.25: 30, 0.5: 60, 1.0: 120}  # round(f * 120 / 3) per class
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small]) < set(subsets[large])
    for f, paths in subsets.items():
        per_class = {c: sum(p.startswith(c + "/") for p in paths) for c in FILES}
        assert len(set(per_class.values())) == 1, (f, per_class)


def test_reproducible_seeded_and_independent_of_other_fractions() -> None:
    a = nested_subsets(FILES, [0.1, 0.5], seed=0)
    assert nested_subsets(FILES, [0.5, 0.1], seed=0) == a
    assert nested_subsets(FILES, [0.1], seed=0)[0.1] == a[0.1]  # asking for other fractions changes nothing
    assert nested_subsets(FILES, [0.1], seed=1)[0.1] != a[0.1]
    # Not simply the first files of each class: the draw is random.
    assert a[0.1] != sorted(p for c in FILES for p in FILES[c][:4])


def test_unbalanced_classes_and_bad_fractions() -> None:
    files = {"a": [f"a/{i}" for i in range(50)], "b": [f"b/{i}" for i in range(10)]}
    sub = nested_subsets(files, [0.5], seed=0)[0.5]  # 15 per class wanted; b has only 10
    assert sum(p.startswith("a/") for p in sub) == 15 and sum(p.startswith("b/") for p in sub) == 10
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        nested_subsets(files, [0.0])
    with pytest.raises(ValueError, match="fractions"):
        nested_subsets(files, [1.5])


def test_materialised_trees(tiny_data, tmp_path) -> None:
    subsets = materialise_subsets(tiny_data, [0.25, 1.0], tmp_path / "subsets")
    quarter = subsets[0.25]
    assert quarter.num_images == 15 and quarter.per_class == 5
    linked = class_files(quarter.root / "train")
    assert {c: len(v) for c, v in linked.items()} == {"class0": 5, "class1": 5, "class2": 5}
    for c, names in linked.items():
        for name in names:
            target = os.path.realpath(quarter.root / "train" / name)
            assert target == str((tiny_data / "train" / name).resolve())
    assert (quarter.root / "test").resolve() == (tiny_data / "test").resolve()
    assert subsets[1.0].num_images == 60
    assert set(linked["class0"]) <= set(class_files(subsets[1.0].root / "train")["class0"])
    # A second study (another model, a resumed run) gets the identical tree and digest, untouched.
    mtime = (quarter.root / "subset.json").stat().st_mtime_ns
    again = materialise_subsets(tiny_data, [0.25], tmp_path / "subsets")
    assert again[0.25].digest == quarter.digest == file_digest(
        [os.path.join(c, n.split("/", 1)[1]) for c, v in linked.items() for n in v])
    assert (quarter.root / "subset.json").stat().st_mtime_ns == mtime


def test_missing_test_split_is_named(tmp_path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="full test split"):
        materialise_subsets(tmp_path, [0.5], tmp_path / "out")


def test_validation_split_is_balanced_disjoint_and_seeded() -> None:
    from vitlab.study.subsets import split_validation

    val, rest = split_validation(FILES, 0.1, seed=0)
    for c in FILES:
        assert len(val[c]) == 4 and len(rest[c]) == 36  # round(0.1 * 40)
        assert not set(val[c]) & set(rest[c]) and sorted(val[c] + rest[c]) == FILES[c]
    assert split_validation(FILES, 0.1, seed=0) == (val, rest)
    assert split_validation(FILES, 0.1, seed=1)[0] != val
    # The validation draw does not follow the subset draw: the first subset files of a class are not its val files.
    assert nested_subsets(FILES, [0.1], seed=0)[0.1] != sorted(p for v in val.values() for p in v)
    with pytest.raises(ValueError, match="at least 2 per class"):
        split_validation({"a": ["a/0"]}, 0.5)


def test_per_class_subsets_are_nested(tiny_data, tmp_path) -> None:
    from vitlab.study.subsets import materialise_per_class, nested_per_class

    chosen = nested_per_class(FILES, [2, 10, None], seed=0)
    assert [len(chosen[k]) for k in (2, 10, None)] == [6, 30, 120]
    assert set(chosen[2]) < set(chosen[10]) < set(chosen[None])
    assert chosen[10] == nested_subsets(FILES, [0.25], seed=0)[0.25]  # 10 per class is fraction 0.25 here
    subsets = materialise_per_class(tiny_data, [3, None], tmp_path / "s")
    assert subsets[3].num_images == 9 and subsets[3].per_class == 3 and subsets[None].num_images == 60
    assert (subsets[3].root / "test").resolve() == (tiny_data / "test").resolve()
    with pytest.raises(ValueError, match="must be positive"):
        nested_per_class(FILES, [0])
