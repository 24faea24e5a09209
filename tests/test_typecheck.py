"""The one type check of the config dataclasses (vitlab.typecheck), by hand on a small dataclass and on the two
configs that use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import pytest

from vitlab.model import ViTConfig
from vitlab.train import TrainConfig
from vitlab.typecheck import check_types, describe


@dataclass(frozen=True)
class Example:
    kind: Literal["a", "b"] = "a"
    size: Union[int, tuple[int, int]] = 3
    layers: tuple[int, ...] = (1, 2)
    rate: float = 0.5
    flag: bool = False
    name: Optional[str] = None

    def __post_init__(self) -> None:
        check_types(self)


def test_values_from_yaml_become_what_the_annotation_says():
    e = Example(size=[4, 5], layers=[1, 2, 3], rate=2)
    assert e.size == (4, 5) and e.layers == (1, 2, 3) and e.rate == 2.0 and type(e.rate) is float
    assert Example() == Example(layers=[1, 2])


def test_every_wrong_field_is_named_with_what_was_expected():
    with pytest.raises(ValueError) as e:
        Example(kind="c", size=[1, 2, 3], layers=(1, "x"), rate=True, flag=1, name=3)
    assert str(e.value) == ("invalid Example: kind='c' (expected 'a' | 'b'); size=[1, 2, 3] (expected int | "
                            "[int, int]); layers=(1, 'x') (expected tuple of int); rate=True (expected float); "
                            "flag=1 (expected bool); name=3 (expected str | null)")
    assert describe(Optional[list[int]]) == "list of int | null"


def test_both_configs_use_it():
    with pytest.raises(ValueError, match=r"invalid ViTConfig: gelu='erf' \(expected 'exact' \| 'tanh'\)"):
        ViTConfig(gelu="erf")
    with pytest.raises(ValueError, match=r"invalid TrainConfig: precision='fp16' \(expected 'auto' \| 'fp32' \| "
                                         r"'bf16'\)"):
        TrainConfig(precision="fp16")
    assert ViTConfig(image_size=[32, 48], patch_size=16, dropout=0).image_size == (32, 48)
