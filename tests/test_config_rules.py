"""The config schema states how options interact: exclusive keys, keys that need others, bounds, renamed keys."""

from __future__ import annotations

import pytest

from sftlab.config import ConfigError, RunConfig, load_config
from sftlab.models import resolve_attention


def test_batch_size_switches_batch_tokens_off_and_both_is_an_error():
    assert load_config(None, []).train.batch_tokens == 4096
    cfg = load_config(None, ["train.batch_size=8"])
    assert cfg.train.batch_size == 8 and cfg.train.batch_tokens is None
    with pytest.raises(ConfigError, match="either train.batch_size or train.batch_tokens"):
        load_config(None, ["train.batch_size=8", "train.batch_tokens=2048"])
    with pytest.raises(ConfigError, match="packed sizes its rows by train.batch_tokens"):
        load_config(None, ["train.batching=packed", "train.batch_size=8"])


def test_early_stopping_needs_eval_every_and_intervals_are_positive():
    with pytest.raises(ConfigError, match="early_stopping_patience needs train.eval_every"):
        load_config(None, ["train.early_stopping_patience=2"])
    assert load_config(None, ["train.early_stopping_patience=2", "train.eval_every=5"]).train.eval_every == 5
    for key in ("max_steps", "eval_every", "save_every", "early_stopping_patience", "batch_size"):
        with pytest.raises(ConfigError, match=f"train.{key}: Input should be greater than or equal to 1"):
            load_config(None, [f"train.{key}=0"])


def test_task_map_and_task_field_are_exclusive_in_every_command():
    with pytest.raises(ConfigError, match="either task_map or task_field"):
        load_config(None, ["data.task_map=map.json", "data.task_field=task"])


def test_renamed_keys_name_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match="'data.eval' was renamed to 'data.validation'"):
        load_config(None, ["data.eval=[a.jsonl]"])
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval_fraction: 0.1\n")
    with pytest.raises(ConfigError, match=f"{path}: data: 'data.eval_fraction' was renamed to 'data.validation_fraction'"):
        load_config(path, [])
    assert load_config(None, ["data.validation_fraction=0.1"]).data.validation_fraction == 0.1


def test_auto_attention_is_resolved_in_one_place():
    assert resolve_attention("auto", "cpu", training=True) == "segments"
    # elsewhere transformers' own default: sdpa where the model supports it, else eager (gpt-oss)
    assert resolve_attention("auto", "cuda", training=True) is None
    assert resolve_attention("auto", "cpu", training=False) is None
    assert resolve_attention("eager", "cpu", training=True) == "eager"
    assert RunConfig().model.attn_implementation == "auto"
