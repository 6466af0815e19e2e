"""The typed config: sections and defaults, key suggestions, cross-field rules, renamed keys."""

from __future__ import annotations

from typing import get_args

import pytest

from sftlab.config import ConfigError, SelectConfig, load_config
from sftlab.runner import plan


def test_config_sections_and_errors(tmp_path):
    from sftlab.select import STRATEGIES

    cfg = load_config(None, [])
    assert cfg.audit.enabled and cfg.select.strategy is None and cfg.eval.data == [] and cfg.report is True
    assert [s.name for s in plan(load_config(None, ["data.train=[x.jsonl]"]))] == ["audit", "train", "report"]
    assert get_args(get_args(SelectConfig.model_fields["strategy"].annotation)[0]) == STRATEGIES
    with pytest.raises(ConfigError, match="did you mean 'eval.limit'"):
        load_config(None, ["eval.limt=3"])
    with pytest.raises(ConfigError, match="select.budget is required"):
        load_config(None, ["select.strategy=ifd-top"])
    with pytest.raises(ConfigError, match="select.budget: .*got 'half'"):
        load_config(None, ["select.strategy=ifd-top", "select.budget=half"])
    assert load_config(None, ["select.strategy=ifd-top", "select.budget=10%"]).select.budget == "10%"
    bad = tmp_path / "bad.yaml"
    bad.write_text("audit:\n  few_shots: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'audit.few_shots'; did you mean 'audit.few_shot'"):
        load_config(bad)


def test_renamed_eval_key_names_the_new_one():
    with pytest.raises(ConfigError, match="'eval.batch_tokens' was renamed to 'eval.forward_batch_tokens'"):
        load_config(None, ["eval.batch_tokens=2048"])
    cfg = load_config(None, ["eval.forward_batch_tokens=2048", "eval.max_labels=5", "eval.text_window=64"])
    assert (cfg.eval.forward_batch_tokens, cfg.eval.max_labels, cfg.eval.text_window) == (2048, 5, 64)
