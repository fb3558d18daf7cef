"""Config: the shipped YAML equals the defaults; bad keys and values are named with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evertune.config import Config, default_config_text, load_config, parse_config
from evertune.errors import ConfigError


def test_shipped_yaml_is_valid_and_equals_the_defaults() -> None:
    raw = yaml.safe_load(default_config_text())
    assert parse_config(raw) == Config()


def test_every_default_key_is_documented_in_the_shipped_yaml() -> None:
    text = default_config_text()
    for section, model in Config.model_fields.items():
        assert f"\n{section}:" in text, section
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f" {key}:" in text, f"{section}.{key} missing from default_config.yaml"


def test_unknown_key_is_named_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"n_epoch": 2}})
    assert "train.n_epoch" in str(err.value)
    assert "unknown key" in str(err.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"train": {"n_epochs": 0, "learning_rate": "fast"}, "data": {"overlong": "drop"}}
        )
    problems = err.value.problems
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "train.n_epochs" in joined and "train.learning_rate" in joined
    assert "data.overlong" in joined and "'reject'" in joined and "'drop'" in joined


def test_split_ratios_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match="sum to 1.0"):
        parse_config({"data": {"split": {"train": 0.9, "validation": 0.1, "test": 0.1}}})


def test_set_overrides_parse_yaml_values_and_nest() -> None:
    cfg = parse_config(
        {},
        [
            "train.n_epochs=2", "train.lora.target_modules=[q_proj, v_proj]",
            "data.golden_set=g.jsonl",
        ],
    )
    assert cfg.train.n_epochs == 2
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.golden_set == "g.jsonl"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochs=2", "unknown key 'epochs' at train; allowed: backend"),
        ("nope.x=1", "unknown key 'nope' at top level"),
        ("train.n_epochs", "expected key=value"),
    ],
)
def test_bad_overrides_are_explained(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({}, [override])
    assert fragment in str(err.value)


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="evertune init"):
        load_config(tmp_path / "evertune.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
