"""pretrain.typed_yaml on a schema of its own (the recipe's cases are in test_recipe*.py): it knows no
recipe, so a small dataclass tree must build, refuse and round-trip the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pretrain.model.config import ConfigError
from pretrain.typed_yaml import apply_override, convert, dump_yaml, parse_yaml, to_plain


@dataclass
class Stage:
    name: str
    weight: float = 1.0


@dataclass
class Plan:
    steps: int
    mode: Literal["fast", "slow"] = "fast"
    betas: tuple[float, float] = (0.9, 0.95)
    note: Optional[str] = None
    stages: list[Stage] = field(default_factory=list)


TEXT = "steps: 3\nmode: slow\nstages:\n  - {name: a}\n  - {name: b, weight: 2}\n"


def test_a_tree_builds_from_yaml_with_defaults_and_round_trips():
    plan = convert(parse_yaml(TEXT, "plan"), Plan, "")
    assert plan == Plan(steps=3, mode="slow", stages=[Stage("a"), Stage("b", 2.0)])
    assert isinstance(plan.stages[1].weight, float)  # an int where a float is due is widened
    assert convert(parse_yaml(dump_yaml(to_plain(plan)), "again"), Plan, "") == plan


@pytest.mark.parametrize("text, says", [
    ("steps: true\n", "steps: expected an int, got True (bool)"),  # bool is an int in Python, not here
    ("steps: 3\nmode: 1\n", "mode: expected one of 'fast', 'slow', got 1 (int)"),
    ("steps: 3\nbetas: [0.9]\n", "betas: expected a list of 2 items, got [0.9] (list)"),
    ("steps: 3\nstages: [{name: a, wieght: 2}]\n", "stages[0].wieght: unknown key; did you mean weight?"),
    ("mode: fast\n", "steps: missing; the recipe must set it"),
    ("steps: 3\nsteps: 4\n", "plan: duplicate key 'steps': write each key once"),
    ("steps: 010\n", "plan: '010' reads as a YAML 1.1 octal or base-60 number"),
])
def test_bad_values_are_one_line_naming_the_dotted_key(text, says):
    with pytest.raises(ConfigError) as err:
        convert(parse_yaml(text, "plan"), Plan, "")
    assert str(err.value).startswith(says), err.value
    assert "\n" not in str(err.value)


def test_overrides_address_nested_keys_and_list_items():
    data = parse_yaml(TEXT, "plan")
    for override in ("stages[1].weight=0.5", "stages.0.name=z", "note=1e5", "extra.deep.key=[1, 2]"):
        apply_override(data, override)
    assert data["stages"] == [{"name": "z"}, {"name": "b", "weight": 0.5}]
    assert data["note"] == 1e5 and data["extra"] == {"deep": {"key": [1, 2]}}  # 1e5 reads as a float
    with pytest.raises(ConfigError, match=r"^stages\[5\]: stages is a list of 2 items"):
        apply_override(data, "stages[5].name=x")
    with pytest.raises(ConfigError, match=r"^steps: the override value ': \{' is not valid YAML: "):
        apply_override(data, "steps=: {")


def test_a_string_that_looks_like_a_number_stays_a_string_through_dump():
    text = dump_yaml({"note": "1e5", "n": 1e5})
    assert parse_yaml(text, "t") == {"note": "1e5", "n": 1e5}
