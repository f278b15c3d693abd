"""Training configs: JSON/TOML parsing, overrides, and errors naming where the bad value came from
(the command-line override, or the file, its line and the key path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.train.config import TrainConfig, apply_overrides, load_config, parse_override

GOOD_TOML = """\
task = "listops"
out_dir = "runs/x"
attention = "full"
max_steps = 10
batch_size = 4

[task_options]
min_length = 10
max_length = 40

[model]
dim = 32
depth = 1
heads = 2
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_json_give_the_same_config(tmp_path: Path) -> None:
    import tomllib

    toml_path = _write(tmp_path, "c.toml", GOOD_TOML)
    json_path = _write(tmp_path, "c.json", json.dumps(tomllib.loads(GOOD_TOML), indent=2))
    a, b = load_config(toml_path), load_config(json_path)
    assert a == b
    assert a.task_options == {"min_length": 10, "max_length": 40} and a.model["dim"] == 32
    assert TrainConfig.from_dict(a.to_dict()) == a


def test_overrides_reach_into_tables(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "c.toml", GOOD_TOML), ["max_steps=99", "model.dim=64", "attention=full"])
    assert config.max_steps == 99 and config.model["dim"] == 64
    assert parse_override("out_dir=runs/a=b") == (["out_dir"], "runs/a=b")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_override("max_steps")


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("max_steps = 10", "max_steps = 0"), r"c.toml, line 4: key 'max_steps' must be a positive integer, got 0"),
        (("max_steps = 10", 'max_steps = "ten"'), r"line 4: key 'max_steps' must be a positive integer, got 'ten'"),
        (
            ("batch_size = 4", "batchsize = 4"),
            r"line 5: key 'batchsize' is not a training option \(did you mean 'batch_size'\?\)",
        ),
        (
            ('task = "listops"', 'task = "lisops"'),
            r"line 1: key 'task' must be one of listops, .* or an existing data path",
        ),
        (("dim = 32", "dim = 33"), r"line 12: \[model\] key 'dim' is invalid: dim must be divisible by heads"),
        (
            ("depth = 1", "deepth = 1"),
            r"line 13: \[model\] key 'deepth' is not a TransformerConfig field \(did you mean 'depth'\?\)",
        ),
        (
            ("min_length = 10", "min_length = 100"),
            r"key 'task_options' is invalid for task 'listops': min_length must be <= max_length",
        ),
        (('attention = "full"', 'attention = "ful"'), r"key '(model|attention)' is invalid: .*ful"),
    ],
)
def test_bad_values_name_file_key_and_line(tmp_path: Path, replace: tuple[str, str], message: str) -> None:
    path = _write(tmp_path, "c.toml", GOOD_TOML.replace(*replace))
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_syntax_errors_carry_the_parser_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"c.toml: invalid TOML: .*line 2"):
        load_config(_write(tmp_path, "c.toml", 'task = "copy"\nout_dir = \n'))
    with pytest.raises(ValueError, match=r"c.json, line 3, column \d+: invalid JSON"):
        load_config(_write(tmp_path, "c.json", '{\n "task": "copy",\n "out_dir" "x"\n}'))
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        load_config(_write(tmp_path, "c.yaml", "task: copy"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="missing required key 'out_dir'"):
        load_config(_write(tmp_path, "d.json", '{"task": "copy"}'))


def test_data_decided_model_fields_and_batch_split_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 15: \[model\] key 'vocab_size' is set from the data"):
        load_config(_write(tmp_path, "c.toml", GOOD_TOML + "vocab_size = 9\n"))
    with pytest.raises(ValueError, match="key 'grad_accum' must divide batch_size=4, got 3"):
        load_config(_write(tmp_path, "c.toml", GOOD_TOML), ["grad_accum=3"])
    with pytest.raises(ValueError, match="key 'precision' must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"):
        load_config(_write(tmp_path, "c.toml", GOOD_TOML), ["precision=fp8"])


def test_relative_data_path_resolves_against_the_config(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "hello", "label": 1}\n')
    path = _write(tmp_path, "c.json", json.dumps({"task": "data.jsonl", "out_dir": "x"}))
    assert load_config(path).task == str(tmp_path / "data.jsonl")


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.toml")) + sorted(root.glob("*.json"))
    assert paths, "configs/ should hold example configs"
    for path in paths:
        load_config(path, ["attention=full", "attention_options={}"])


# ----------------------------------------------------------------------------- where a bad value came from

WINDOW_TOML = """\
# attnkit train w.toml attention=full   (a comment that mentions attention_options and window)
task = "listops"
out_dir = "runs/x"
attention = "sliding_window"
max_steps = 10

[task_options]
min_length = 10
max_length = 40

[attention_options]
window = 8

[model]
dim = 32
depth = 1
heads = 2
"""


def test_a_bad_override_is_reported_as_the_override_not_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "w.toml", WINDOW_TOML)
    with pytest.raises(ValueError) as err:
        load_config(path, ["max_steps=abc"])
    assert (
        str(err.value) == "command-line override 'max_steps=abc': key 'max_steps' must be a positive integer, got 'abc'"
    )
    with pytest.raises(
        ValueError, match=r"^command-line override 'model.dim=33': key 'model.dim' is invalid: dim must"
    ):
        load_config(path, ["model.dim=33"])
    with pytest.raises(ValueError, match=r"^command-line override 'max_step=5': key 'max_step' is not a training op"):
        load_config(path, ["max_step=5"])
    # An override that replaces a whole table owns every key inside it.
    with pytest.raises(ValueError, match=r"^command-line override 'attention_options=\{\"windw\": 3\}': "):
        load_config(path, ['attention_options={"windw": 3}'])
    # The last override of a key wins, so it is the one named.
    with pytest.raises(ValueError, match=r"^command-line override 'max_steps=0': "):
        load_config(path, ["max_steps=abc", "max_steps=0"])


def test_a_table_from_the_file_with_an_override_inside_names_both(tmp_path: Path) -> None:
    path = _write(tmp_path, "w.toml", WINDOW_TOML)
    with pytest.raises(ValueError) as err:
        load_config(path, ["task_options.max_length=5"])
    message = str(err.value)
    assert message.startswith(f"{path}, line 7 (with command-line override 'task_options.max_length=5'): ")
    assert "key 'task_options' is invalid for task 'listops': min_length must be <= max_length" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A typo inside [attention_options] is reported at that key, not against 'attention'.
        (
            WINDOW_TOML.replace("window = 8", "windw = 8"),
            r"w.toml, line 12: \[attention_options\] key 'windw' is invalid: .*has no option\(s\) \['windw'\] "
            r"\(did you mean 'window'\?\); accepted: window, ",
        ),
        (
            WINDOW_TOML.replace("[attention_options]\nwindow = 8", "[attention_options.sliding_window]\nwindw = 8"),
            r"w.toml, line 12: \[attention_options.sliding_window\] key 'windw' is invalid: ",
        ),
        # A bad option value is caught now, at its key, not later inside model construction.
        (
            WINDOW_TOML.replace("window = 8", "window = 0"),
            r"w.toml, line 12: \[attention_options\] key 'window' is invalid for attention 'sliding_window': "
            r"window must be a positive integer, got 0",
        ),
        # The same key name in an earlier table must not steal the line.
        (
            WINDOW_TOML.replace('"sliding_window"', '"full"').replace("window = 8", "dropout = 0.1")
            + "dropout = 1.5\n",
            r"w.toml, line 18: \[model\] key 'dropout' is invalid: dropout must be a number in \[0, 1\)",
        ),
        # Options for a mechanism no layer uses would be dropped silently: an error instead.
        (
            WINDOW_TOML.replace('"sliding_window"', '"full"').replace(
                "[attention_options]", "[attention_options.sliding_window]"
            ),
            r"w.toml, line 11: \[attention_options\] key 'sliding_window' is invalid: .*no layer uses it",
        ),
    ],
    ids=["option-typo", "keyed-option-typo", "option-value", "same-name-elsewhere", "unused-keyed-options"],
)
def test_file_errors_point_at_the_key_path_and_its_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, "w.toml", text))


def test_json_errors_name_the_dotted_key_path_and_its_line(tmp_path: Path) -> None:
    data = {
        "task": "listops",
        "out_dir": "x",
        "attention": "sliding_window",
        "task_options": {"min_length": 10, "max_length": 40},
        "attention_options": {"sliding_window": {"windw": 3}},
    }
    path = _write(tmp_path, "w.json", json.dumps(data, indent=2))
    line = json.dumps(data, indent=2).splitlines().index('      "windw": 3') + 1
    with pytest.raises(ValueError, match=rf"w.json, line {line}: key 'attention_options.sliding_window.windw' is inv"):
        load_config(path)


def test_build_data_carries_every_data_field_of_the_run() -> None:
    """Every command that rebuilds a run's data (trainer, eval, compress, distill, summaries) goes through
    TrainConfig.build_data: task options, seed and objective must all reach the data."""
    from attnkit.data.tasks import MQAR

    config = TrainConfig(task="mqar", out_dir="unused", task_options={"num_pairs": 3, "gap": 5}, seed=7, seq_len=64)
    data = config.build_data()
    # the same examples as the task built by hand with those options and seed
    expected = MQAR(num_pairs=3, gap=5).examples(4, seed=7, split="validation", unique=True)
    got = data.eval_examples("validation", 4)
    assert [e.input_ids for e in got] == [e.input_ids for e in expected]
    assert config.build_data(seed=8).eval_examples("validation", 4)[0].input_ids != got[0].input_ids
    # a masked-LM run's data is masked-LM data (compress and summaries used to build causal data for it)
    masked = TrainConfig(task="text", out_dir="unused", seq_len=32, tokenizer="byte", objective="mlm")
    assert masked.build_data().kind == "mlm"
    assert masked.build_data(seq_len=16).eval_examples("validation", 1)[0].length <= 17


def test_per_head_mixing_from_a_config_file(tmp_path: Path) -> None:
    """A TOML head-group list reaches the model: each layer splits its heads between two mechanisms."""
    from attnkit.train.modeling import model_class, model_config

    text = GOOD_TOML.replace(
        'attention = "full"',
        'attention = [{mechanism = "sliding_window", heads = 1, options = {window = 4}}, '
        '{mechanism = "linear", heads = 1}]',
    )
    config = load_config(_write(tmp_path, "mix.toml", text))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    data = config.build_data()
    model = model_class(data.kind)(model_config(data, config.attention, config.attention_options, config.model))
    layers = [m for m in model.modules() if type(m).__name__ == "TransformerLayer"]
    assert layers and all(layer.mechanisms == ("sliding_window", "linear") for layer in layers)
    bad = text.replace("heads = 1}]", "heads = 3}]")
    with pytest.raises(ValueError, match="heads"):
        load_config(_write(tmp_path, "bad.toml", bad))
