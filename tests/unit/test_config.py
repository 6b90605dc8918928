"""Config loading: strict keys and types, overrides, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import DataConfig, ModelConfig, TrainConfig, field_docs, load_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        config = load_config(path)
        assert config.model.name_or_path


def test_overrides_set_nested_keys_with_types(tmp_path):
    path = write(tmp_path, "model: {name_or_path: m}\ntrain: {lr: 0.001}\n")
    config = load_config(path, ["train.lr=1e-4", "train.max_steps=7", "data.packing=true", "output_dir=x"])
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.max_steps == 7
    assert config.data.packing is True
    assert config.output_dir == "x"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML alone reads `2e-4` and `1.0e5` as strings; a config must not fail on them.
    path = write(tmp_path, "model: {name_or_path: m}\ntrain: {lr: 2e-4, weight_decay: 1E-2}\n")
    config = load_config(path)
    assert config.train.lr == pytest.approx(2e-4)
    assert config.train.weight_decay == pytest.approx(1e-2)
    assert load_config(path, ["train.lr=1.0e5"]).train.lr == pytest.approx(1e5)
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer or null, got 1000.0"):
        load_config(path, ["train.max_steps=1e3"])


def test_overrides_leave_the_callers_sections_as_given():
    method = {"name": "lora", "r": 4}
    config = load_config(None, ["method.r=16"], model={"name_or_path": "m"}, method=method)
    assert config.method.options.r == 16 and method == {"name": "lora", "r": 4}


def test_method_options_are_parsed_by_the_method(tmp_path):
    path = write(
        tmp_path, "model: {name_or_path: m}\nmethod: {name: partial, last_layers: 2, modules: [lm_head]}\n"
    )
    config = load_config(path)
    assert config.method.name == "partial"
    assert config.method.options.last_layers == 2
    assert config.method.options.modules == ["lm_head"]


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model: {name_or_path: m}\ntrain: {lrr: 1}\n", [], "unknown key 'train.lrr'"),
        ("model: {name_or_path: m}\ntrain: {batch_size: two}\n", [], "train.batch_size: expected an integer"),
        ("model: {name_or_path: m}\ntrain: {batch_size: 0}\n", [], "train.batch_size: must be at least 1"),
        ("model: {name_or_path: m}\ntrain: {schedule: wavy}\n", [], "train.schedule: must be one of"),
        (
            "model: {name_or_path: m}\nmethod: {name: partial, last_layer: 2}\n",
            [],
            "unknown key 'method.last_layer'",
        ),
        ("model: {name_or_path: m}\nmethod: {name: magic}\n", [], "method.name: must be one of"),
        ("model: {name_or_path: m}\n", ["train.nope=3"], "unknown key 'train.nope'"),
        ("model: {name_or_path: m}\nbogus: 1\n", [], "unknown key 'bogus'"),
        ("model: {name_or_path: m}\ntrain: {resume: 3}\n", [], "expected true or false"),
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert expected in str(err.value)
    if not overrides:
        assert str(path) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"model: {name_or_path: x\n  bad: [\n", r"not valid YAML: line 2, column 6: expected"),
        (b"model: {name_or_path: x}\n---\ntrain: {}\n", r"single document .* line 2, column 1"),
        (b"model: {name_or_path: x}\x00\n", r"line 1, column 25: unacceptable character #x0000"),
        (b"model: {name_or_path: x}\ntrain: {lr: 1}\ntrain: {lr: 2}\n", r"line 3.*'train' is given twice"),
        (b"model: {name_or_path: \xff}\n", r"not UTF-8 text \(line 1"),
        (b"model: " + b"[" * 1000 + b"]" * 1000 + b"\n", r"nested too deeply"),
        (b"- model\n- data\n", r"must be a mapping of sections .* not a list"),
        (b"just words\n", r"not a str"),
    ],
)
def test_unreadable_configs_are_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_an_override_that_is_not_yaml_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[': the value is not valid YAML: line 1"):
        load_config(write(tmp_path, "model: {name_or_path: m}\n"), ["train.lr=["])


def test_every_field_has_a_docstring():
    for cls in (TrainConfig, DataConfig, ModelConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_prefix_tuning_with_packing_is_refused_when_the_config_loads(tmp_path):
    """Prefix tuning's prefix is a key/value cache packed attention cannot take: SFT with both is a
    ConfigError naming both keys (and the file) before any model loads ("m" is no model)."""
    path = write(tmp_path, "model: {name_or_path: m}\nmethod: {name: prefix}\ndata: {packing: true}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.packing" in message and "method.name: prefix" in message and str(path) in message
    assert load_config(path, ["data.packing=false"]).method.name == "prefix"
    # The preference and RL objectives pad (and say that packing is ignored).
    assert load_config(path, ["objective.name=dpo"]).data.packing


RLHF = ROOT / "data" / "rlhf"


@pytest.mark.parametrize(
    ("objective", "train_file", "says"),
    [
        ({"name": "dpo"}, "preference_train.jsonl", "ignored by objective dpo; pairs are padded"),
        ({"name": "reward"}, "preference_train.jsonl", "ignored by objective reward; pairs are padded"),
        (
            {"name": "grpo", "reward_functions": ["tunelab.rl.rewards:one_line"]},
            "prompts_train.jsonl",
            "ignored by objective grpo; rollouts are padded",
        ),
    ],
    ids=["dpo", "reward", "grpo"],
)
def test_packing_ignored_by_an_objective_says_so(llama_dir, tmp_path, capsys, objective, train_file, says):
    """`data.packing` does nothing for the objectives that pad pairs or rollouts: their set-up says
    so in one line (and says nothing without it)."""
    from tunelab.objectives.pairs import read_pairs, report_pairs
    from tunelab.rl.online import OnlineRun
    from tunelab.training.setup import setup_run

    for packing in (True, False):
        config = load_config(
            None,
            [f"data.packing={str(packing).lower()}"],
            model={"name_or_path": str(llama_dir)},
            objective=objective,
            data={"train": str(RLHF / train_file), "template": "alpaca"},
            train={"progress": False},
            output_dir=str(tmp_path / str(packing)),
        )
        if objective["name"] == "grpo":
            OnlineRun.setup(config, answer="completion")
        else:
            run = setup_run(config)
            report_pairs(run, read_pairs(config, run.tokenizer))
        said = capsys.readouterr().out
        assert said.count(f"[tunelab] data.packing: true is {says}") == packing, said
