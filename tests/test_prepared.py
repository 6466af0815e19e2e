"""Prepared data (sftlab/data/prepared.py): the cache holds exactly what the streamed pipeline gives, for any
worker count; a changed input, option, template or tokenizer is another entry; a half-written entry is never
used; training and `data inspect` read it, and a second `sftlab train` tokenizes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sftlab.config import DataConfig, load_config
from sftlab.data.pipeline import DataReport, iter_examples
from sftlab.data.prepared import Chained, Prepared, cache_key, fingerprint, open_entry, prepare, trained_counts
from sftlab.data.template import resolve_template
from sftlab.data.validate import DataError
from sftlab.train.loop import prepare_data, train
from sftlab.train.plan import epoch_batches

ROOT = Path(__file__).resolve().parents[1]


def write_mixed(d: Path) -> list[Path]:
    """Three files: alpaca, multi-turn messages with a system prompt, prompt/completion with invalid records,
    one over-long example and a task field."""
    d.mkdir(parents=True, exist_ok=True)
    alpaca = d / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "input": "" if i % 2 else "slowly",
                                          "output": " ".join(map(str, range(1, i + 2)))}) + "\n" for i in range(30)))
    msgs = d / "chat.jsonl"
    rows = []
    for i in range(25):
        m = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Name a colour #{i}."},
             {"role": "assistant", "content": ["red", "blue", "green"][i % 3]}]
        if i % 4 == 0:
            m += [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "yellow " * (i + 1)}]
        rows.append(json.dumps({"messages": m}))
    msgs.write_text("\n".join(rows) + "\n")
    pc = d / "pc.jsonl"
    rows = [json.dumps({"prompt": f"Q{i}: " + "word " * (3 + i), "completion": "yes" if i % 3 else "no"})
            for i in range(40)]
    rows[5] = "{not json"
    rows[9] = json.dumps({"prompt": "empty", "completion": ""})
    rows[11] = json.dumps({"prompt": "long " * 400, "completion": "ok"})
    pc.write_text("\n".join(rows) + "\n")
    return [alpaca, msgs, pc]


def same(a, b) -> bool:
    return (a.input_ids, a.labels, a.weights, a.task, a.truncated) == (b.input_ids, b.labels, b.weights, b.task,
                                                                         b.truncated)


@pytest.mark.parametrize("extra", [{}, {"prompt_loss_weight": 0.25}, {"loss_on": "last_assistant",
                                                                       "truncation": "drop"}])
def test_cache_holds_exactly_the_streamed_examples_for_any_worker_count(tmp_path, tokenizer, extra):
    files = write_mixed(tmp_path / "data")
    opts = DataConfig(skip_invalid=True, max_length=96, **extra)
    report = DataReport()
    ref = list(iter_examples(files, tokenizer, opts, report))
    built = {}
    for w in (1, 2):
        b = prepare(files, tokenizer, opts.model_copy(update={"num_workers": w}), root=tmp_path / f"c{w}")
        assert not b.hit
        built[w] = b.prepared
        assert len(b.prepared) == len(ref) and all(same(x, y) for x, y in zip(ref, b.prepared))
        assert b.prepared.report().as_dict() == report.as_dict()
        assert b.prepared.lengths.tolist() == [len(ex.input_ids) for ex in ref]
        want = [sum(1 for x in ex.labels if x != -100) if ex.weights is None else sum(w == 1.0 for w in ex.weights)
                for ex in ref]
        assert trained_counts(b.prepared).tolist() == want
    assert report.invalid.total >= 2 and report.truncated + sum(report.dropped.values()) >= 1
    for name in ("input_ids.bin", "mask.bin", "digests.bin", "offsets.npy", "task_ids.npy", "truncated.npy"):
        assert (built[1].path / name).read_bytes() == (built[2].path / name).read_bytes(), name
    assert built[1].path.name == built[2].path.name  # workers are not part of the key
    assert fingerprint(built[1]) == fingerprint(ref)
    sub = built[1].select([4, 0, 7])
    assert all(same(sub[k], ref[i]) for k, i in enumerate([4, 0, 7])) and sub.lengths.tolist() == [
        len(ref[i].input_ids) for i in (4, 0, 7)]
    # the fingerprint from the stored digests = the one computed from the examples, for a subset and a chain too
    picked = [ref[i] for i in (4, 0, 7)]
    assert fingerprint(sub) == fingerprint(picked) != fingerprint(ref)
    assert fingerprint(Chained(sub, built[2])) == fingerprint(picked + ref)
    assert fingerprint(built[1].select([0, 4, 7])) != fingerprint(sub)  # order counts


def test_key_follows_content_options_template_and_tokenizer(tmp_path, tokenizer):
    files = write_mixed(tmp_path / "data")
    opts = DataConfig(skip_invalid=True)
    tmpl = resolve_template("default", tokenizer)
    key, _ = cache_key(files, tokenizer, tmpl, opts)
    assert cache_key(files, tokenizer, tmpl, opts)[0] == key
    # not in the key: where the cache is, how many workers, the validation split, skip_invalid
    assert cache_key(files, tokenizer, tmpl, opts.model_copy(update={
        "num_workers": 3, "cache_dir": "/x", "validation_fraction": 0.2, "skip_invalid": False}))[0] == key
    for change in ({"max_length": 64}, {"loss_on": "all"}, {"strip": ["no"]}, {"train_reasoning": False},
                   {"prompt_loss_weight": 0.1}, {"dedup": True}):
        assert cache_key(files, tokenizer, tmpl, opts.model_copy(update=change))[0] != key, change
    assert cache_key(files, tokenizer, resolve_template("chatml", tokenizer), opts)[0] != key
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra_marker>"])
    assert cache_key(files, other, tmpl, opts)[0] != key
    # the same bytes under another name are the same data; one changed byte is not
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = [moved / f.name for f in files]
    for f, c in zip(files, copies):
        c.write_bytes(f.read_bytes())
    assert cache_key(copies, tokenizer, tmpl, opts)[0] == key
    copies[0].write_text(copies[0].read_text().replace("Count to 3.", "Count to 4."))
    assert cache_key(copies, tokenizer, tmpl, opts)[0] != key
    b1 = prepare(copies, tokenizer, opts, root=tmp_path / "c")
    b2 = prepare(copies, tokenizer, opts, root=tmp_path / "c")
    assert not b1.hit and b2.hit and b1.prepared.path == b2.prepared.path


def test_half_written_entry_is_never_used(tmp_path, tokenizer):
    files = write_mixed(tmp_path / "data")
    opts = DataConfig(skip_invalid=True)
    root = tmp_path / "c"
    entry = prepare(files, tokenizer, opts, root=root).prepared.path
    want = (entry / "input_ids.bin").read_bytes()
    with open(entry / "mask.bin", "r+b") as f:  # cut short, as by a full disk or a crash
        f.truncate(10)
    assert open_entry(entry) is None
    again = prepare(files, tokenizer, opts, root=root)
    assert not again.hit and (entry / "input_ids.bin").read_bytes() == want and open_entry(entry) is not None
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    assert open_entry(entry) is None and not prepare(files, tokenizer, opts, root=root).hit
    (entry / "meta.json").unlink()
    assert open_entry(entry) is None and not prepare(files, tokenizer, opts, root=root).hit


def test_a_build_that_fails_leaves_nothing(tmp_path, tokenizer):
    files = write_mixed(tmp_path / "data")
    root = tmp_path / "c"
    with pytest.raises(DataError, match=r"pc\.jsonl:6: invalid JSON"):
        prepare(files, tokenizer, DataConfig(), root=root)
    assert not root.exists() or list(root.iterdir()) == []


def test_entry_built_skipping_invalid_still_stops_a_run_that_does_not(tmp_path, tokenizer):
    files = write_mixed(tmp_path / "data")
    root = tmp_path / "c"
    prepare(files, tokenizer, DataConfig(skip_invalid=True), root=root)
    with pytest.raises(DataError, match=r"pc\.jsonl:6: invalid JSON"):
        prepare(files, tokenizer, DataConfig(), root=root)


def test_training_reads_the_cache_and_matches_the_streamed_path(tmp_path, tiny_model_dir):
    from test_train import losses, make_cfg

    cached = train(make_cfg(tmp_path, tiny_model_dir, "cached", "train.max_steps=4",
                            "data.validation_fraction=0.2", "train.batching=packed", "train.batch_tokens=256"))
    plain = train(make_cfg(tmp_path, tiny_model_dir, "plain", "train.max_steps=4",
                           "data.validation_fraction=0.2", "train.batching=packed", "train.batch_tokens=256",
                           "data.cache=false"))
    assert losses(cached.output_dir) == losses(plain.output_dir)
    assert cached.eval_loss == plain.eval_loss and cached.initial_eval_loss == plain.initial_eval_loss
    a, b = (json.loads((r.output_dir / "summary.json").read_text()) for r in (cached, plain))
    for k in ("data_fingerprint", "train_examples", "eval_examples", "tasks", "data"):
        assert a[k] == b[k], k
    cfg = make_cfg(tmp_path, tiny_model_dir, "x", "data.validation_fraction=0.2")
    from sftlab.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tr, ev, _ = prepare_data(cfg, tok)
    tr2, ev2, _ = prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": False})}), tok)
    assert isinstance(tr, Prepared) and isinstance(tr2, list)
    assert [len(x.input_ids) for x in tr2] == tr.lengths.tolist() and all(same(x, y) for x, y in zip(ev, ev2))
    assert epoch_batches(tr, cfg, 1) == epoch_batches(tr2, cfg, 1)


def test_second_train_tokenizes_nothing_and_inspect_reads_the_same_entry(tmp_path, tiny_model_dir):
    from test_train import write_data

    data = write_data(tmp_path / "train.jsonl")
    cache = tmp_path / "cache"
    env = {**os.environ, "SFTLAB_LOG_EVERY": "0"}
    prep = subprocess.run([sys.executable, "-m", "sftlab", "data", "prepare", str(data), "--out", str(cache),
                           "--model", str(tiny_model_dir), "--task-field", "task", "--max-length", "128",
                           "--num-workers", "2"], capture_output=True, text=True, env=env)
    assert prep.returncode == 0, prep.stderr
    assert "prepared in" in prep.stderr and f"data.cache_dir={cache}" in prep.stderr
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    cmd = [sys.executable, "-m", "sftlab", "train", f"model.path={tiny_model_dir}", f"data.train=[{data}]",
           "data.task_field=task", "data.max_length=128", f"data.cache_dir={cache}", "train.max_steps=1",
           "model.attn_implementation=eager", f"output_dir={tmp_path / 'run'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "from the prepared-data cache" in run.stderr and "nothing tokenized" in run.stderr, run.stderr
    assert str(entries[0]) in run.stderr.replace("\n", "")
    ins = subprocess.run([sys.executable, "-m", "sftlab", "data", "inspect", str(data), "--model",
                          str(tiny_model_dir), "--task-field", "task", "--max-length", "128", "--cache-dir",
                          str(cache), "--json"], capture_output=True, text=True, env=env)
    assert ins.returncode == 0 and "nothing tokenized" in ins.stderr, ins.stderr
    plain = subprocess.run([sys.executable, "-m", "sftlab", "data", "inspect", str(data), "--model",
                            str(tiny_model_dir), "--task-field", "task", "--max-length", "128", "--no-cache",
                            "--json"], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and json.loads(ins.stdout) == json.loads(plain.stdout)
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == entries  # nothing else was built
