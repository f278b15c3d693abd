"""``docs/configuration.md`` is generated from the config classes and must be up to date."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from attnkit.models import TransformerConfig
from attnkit.train import TrainConfig
from attnkit.train.reference import docstring_entries, render, type_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_reference_is_up_to_date() -> None:
    assert DOC.is_file(), "docs/configuration.md is missing: python -m attnkit.train.reference > docs/configuration.md"
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date: run python -m attnkit.train.reference > docs/configuration.md"
    )


@pytest.mark.parametrize("cls", [TrainConfig, TransformerConfig])
def test_every_field_is_documented_and_every_entry_is_a_field(cls: type) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    documented = list(docstring_entries(cls))
    assert documented == fields  # same keys, same order: the reference reads like the class


def test_every_training_key_is_in_the_committed_file_with_its_default() -> None:
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", text, flags=re.MULTILINE))
    assert rows["task"] == "required" and rows["out_dir"] == "required"
    assert rows["max_steps"] == "`1000`" and rows["eval_batch_size"] == "unset"
    for f in dataclasses.fields(TrainConfig):
        assert f.name in rows, f.name


def test_docstring_sections_and_type_names() -> None:
    class Example:
        """Summary.

        Attributes:
            alpha: first line
                continued here.
            beta: ``code`` and :class:`~pkg.mod.Thing`.

        Raises:
            ValueError: not an attribute.
        """

    assert docstring_entries(Example) == {
        "alpha": "first line continued here.",
        "beta": "``code`` and :class:`~pkg.mod.Thing`.",
    }
    assert type_name(int | None) == "integer"
    assert type_name(str | tuple[str, ...]) == "string or list of strings"
    assert type_name(tuple[float, float]) == "list of 2 numbers"
    with pytest.raises(TypeError, match="cannot name the type"):
        type_name(set[int])
