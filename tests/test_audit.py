"""The knowledge audit: exact s_cond / s_uncond / IFD against an independent implementation, resume,
verdict logic, and the `sftlab audit` / `sftlab select` commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sftlab.audit.command import run_audit
from sftlab.audit.verdicts import example_verdict, task_stats, verdict
from sftlab.config import AuditConfig, ConfigError, load_config
from sftlab.config import DataConfig

T0_FILES = ("ag_news_classify.jsonl", "common_gen_Example_prompt.jsonl")
SHORT_T0_FILES = ("sciq_Direct_Question_Closed_Book_.jsonl", "cosmos_qa_only_question_answer.jsonl")  # ~40 tokens
EOT_TEXT = "<|endoftext|>"


# ---- an independent re-implementation with plain transformers ----------------------------------------------------
def _mean_nll(model, ids: list[int], n: int) -> float:
    """Mean NLL of the last n tokens of ids (logits at t-1 predict token t), fp32, natural log."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    picked = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(-picked[-n:].mean())


def reference_scores(model, tokenizer, prompt: str, completion: str) -> dict:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full.endswith("<|im_end|>\n") and full.startswith(head)
    ids = tokenizer(full[:-1], add_special_tokens=False).input_ids  # the newline after <|im_end|> is not trained
    n_head = len(tokenizer(head, add_special_tokens=False).input_ids)
    response = ids[n_head:]  # content + <|im_end|>
    assert response[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    s_cond = _mean_nll(model, ids, len(response))
    s_uncond = _mean_nll(model, header + response, len(response))
    return {"s_cond": s_cond, "s_uncond": s_uncond, "ifd": s_cond / s_uncond, "n_response_tokens": len(response)}


def _raw_record(source: str) -> dict:
    path, line = source.rsplit(":", 1)
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if i == int(line):
                return json.loads(text)
    raise AssertionError(source)


def _check_against_reference(out_dir, model, tokenizer, expected_n: int) -> None:
    rows = [json.loads(line) for line in open(out_dir / "examples.jsonl", encoding="utf-8")]
    assert len(rows) == expected_n
    for row in rows:
        rec = _raw_record(row["source"])
        completion = rec["completion"]
        assert completion.endswith(EOT_TEXT)
        ref = reference_scores(model, tokenizer, rec["prompt"], completion[: -len(EOT_TEXT)].rstrip())
        assert row["n_response_tokens"] == ref["n_response_tokens"]
        for key in ("s_cond", "s_uncond", "ifd"):
            assert row[key] == pytest.approx(ref[key], rel=1e-3), (row["source"], key)


def _t0(shared_data, names=T0_FILES):
    return [str(shared_data / "t0-mixture" / n) for n in names]


def _data(**kw) -> DataConfig:
    return DataConfig(strip=(EOT_TEXT,), **kw)


def test_exact_scores_tiny_model(tmp_path, tiny_model, tokenizer, shared_data):
    opts = AuditConfig(limit_per_task=3, forward_batch_tokens=2048)
    run_audit(_t0(shared_data), tmp_path / "a", opts, _data(), model=tiny_model, tokenizer=tokenizer)
    _check_against_reference(tmp_path / "a", tiny_model, tokenizer, expected_n=6)


@pytest.mark.slow
def test_exact_scores_default_model(tmp_path, tokenizer, shared_data):
    from sftlab.models import load_model

    model = load_model("default", dtype="fp32").eval()
    opts = AuditConfig(limit_per_task=4, dtype="fp32")
    run_audit(_t0(shared_data, SHORT_T0_FILES), tmp_path / "a", opts, _data(), model=model, tokenizer=tokenizer)
    _check_against_reference(tmp_path / "a", model, tokenizer, expected_n=8)


def test_scoring_runs_on_segments_and_leaves_the_model_as_it_was(tmp_path, tiny_model, tokenizer, shared_data):
    """On CPU the scoring forwards take `segments` (verified against the model's eager forward first); the
    model's own attention is back in place afterwards (generation needs its mask), and the scores stay exact."""
    own = tiny_model.config._attn_implementation
    assert own != "segments"
    opts = AuditConfig(limit_per_task=3, forward_batch_tokens=2048, generate=True, max_new_tokens=4)
    run_audit(_t0(shared_data), tmp_path / "a", opts, _data(), model=tiny_model, tokenizer=tokenizer)
    meta = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert meta["scoring_attention"] == "segments" and meta["response_positions_only"] is True
    assert tiny_model.config._attn_implementation == own
    _check_against_reference(tmp_path / "a", tiny_model, tokenizer, expected_n=6)


def test_scoring_attention_falls_back_where_segments_does_not_apply(tiny_model):
    from sftlab.lm import attention_as
    from sftlab.modelcheck import scoring_attention

    assert scoring_attention(tiny_model) == "segments"
    tiny_model.config.attention_chunk_size = 8  # a mask-only pattern segments does not implement
    assert scoring_attention(tiny_model) is None
    own = tiny_model.config._attn_implementation
    with attention_as(tiny_model, "eager"):
        assert tiny_model.config._attn_implementation == "eager"
    assert tiny_model.config._attn_implementation == own


# bf16 scoring (bf16 weights, fp32 cross-entropy) against the exact fp32 path: docs/audit.md, "Precision"
BF16_NLL_ABS, BF16_NLL_REL = 0.05, 0.02


def _bf16_close(a: float, b: float) -> bool:
    return abs(a - b) <= BF16_NLL_ABS + BF16_NLL_REL * abs(b)


@pytest.mark.slow
def test_bf16_fast_path_within_documented_tolerance_of_fp32(tmp_path, tokenizer, shared_data):
    """audit.dtype=bf16 loads bf16 weights (the training path's precision): every s_cond / s_uncond within the
    documented tolerance of the exact fp32 path, on the default model and real data."""
    from sftlab.models import load_model

    rows = {}
    for dtype in ("fp32", "bf16"):
        model = load_model("default", dtype=dtype).eval()
        assert next(model.parameters()).dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        out = tmp_path / dtype
        run_audit(_t0(shared_data, T0_FILES + SHORT_T0_FILES), out, AuditConfig(limit_per_task=6, dtype=dtype),
                  _data(), model=model, tokenizer=tokenizer)
        rows[dtype] = [json.loads(line) for line in open(out / "examples.jsonl")]
    for a, b in zip(rows["bf16"], rows["fp32"], strict=True):
        for key in ("s_cond", "s_uncond"):
            assert _bf16_close(a[key], b[key]), (a["source"], key, a[key], b[key])
    assert any(a["s_cond"] != b["s_cond"] for a, b in zip(rows["bf16"], rows["fp32"]))  # it did run in bf16


def test_scores_ignore_padding_and_batching(tmp_path, tiny_model, tokenizer, shared_data):
    """One example per batch and everything in one batch give the same numbers."""
    rows = {}
    for bt in (1, 100_000):
        out = tmp_path / f"bt{bt}"
        run_audit(_t0(shared_data), out, AuditConfig(limit_per_task=3, forward_batch_tokens=bt), _data(),
                  model=tiny_model, tokenizer=tokenizer)
        rows[bt] = [json.loads(line) for line in open(out / "examples.jsonl")]
    for a, b in zip(rows[1], rows[100_000], strict=True):
        assert a["s_cond"] == pytest.approx(b["s_cond"], rel=1e-5)
        assert a["s_uncond"] == pytest.approx(b["s_uncond"], rel=1e-5)


def test_multi_turn_scores_last_assistant_turn(tmp_path, tiny_model, tokenizer):
    conv = {"messages": [{"role": "user", "content": "Say one."}, {"role": "assistant", "content": "One."},
                         {"role": "user", "content": "Now say two."}, {"role": "assistant", "content": "Two, then."}]}
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps(conv) + "\n")
    run_audit([path], tmp_path / "a", AuditConfig(), DataConfig(), model=tiny_model, tokenizer=tokenizer)
    row = json.loads((tmp_path / "a" / "examples.jsonl").read_text())
    full = tokenizer.apply_chat_template(conv["messages"], tokenize=False)[:-1]
    head = tokenizer.apply_chat_template(conv["messages"][:3], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(full, add_special_tokens=False).input_ids
    n = len(ids) - len(tokenizer(head, add_special_tokens=False).input_ids)
    assert row["n_response_tokens"] == n == len(tokenizer("Two, then.<|im_end|>", add_special_tokens=False).input_ids)
    assert row["s_cond"] == pytest.approx(_mean_nll(tiny_model, ids, n), rel=1e-4)


# ---- resume --------------------------------------------------------------------------------------------------------
def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_resume_after_deleting_lines(tmp_path, tiny_model, tokenizer, shared_data):
    out = tmp_path / "a"
    opts = AuditConfig(limit_per_task=4, few_shot=1, generate=True, max_new_tokens=3, chunk_examples=3)
    run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer)
    first = _rows(out / "examples.jsonl")
    emb = np.load(out / "embeddings.npy")
    assert len(first) == 8 and emb.shape == (8, tiny_model.config.hidden_size)
    kept = first[::2]
    (out / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer)
    meta = json.loads((out / "audit.json").read_text())
    assert meta["status"] == "complete" and meta["resumed"] == 4 and meta["scored"] == 4
    second = _rows(out / "examples.jsonl")
    assert [r["index"] for r in second] == list(range(8))
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
            else:
                assert b[k] == v, k
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), emb, rtol=1e-5, atol=1e-6)
    assert not (out / "examples.partial.jsonl").exists() and not (out / "embeddings.partial").exists()


def test_resume_after_interruption(tmp_path, tiny_model, tokenizer, shared_data):
    out = tmp_path / "a"
    opts = AuditConfig(limit_per_task=3, chunk_examples=2)

    def interrupt_after_two_chunks(k, rows):
        assert len(rows) == 2
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer,
                  on_chunk=interrupt_after_two_chunks)
    assert len(_rows(out / "examples.partial.jsonl")) == 4 and not (out / "examples.jsonl").exists()
    run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer)
    meta = json.loads((out / "audit.json").read_text())
    assert (meta["resumed"], meta["scored"]) == (4, 2)
    resumed = _rows(out / "examples.jsonl")
    run_audit(_t0(shared_data), tmp_path / "b", opts, _data(), model=tiny_model, tokenizer=tokenizer)
    fresh = _rows(tmp_path / "b" / "examples.jsonl")
    assert [(r["index"], r["key"]) for r in resumed] == [(r["index"], r["key"]) for r in fresh]
    for a, b in zip(resumed, fresh):
        assert a["s_cond"] == pytest.approx(b["s_cond"], rel=1e-5)
        assert a["ifd"] == pytest.approx(b["ifd"], rel=1e-5)


def test_resume_after_a_torn_partial_line(tmp_path, tiny_model, tokenizer, shared_data):
    """A kill mid-append leaves half a row: the rerun drops it, rescores that example, and appends cleanly."""
    out = tmp_path / "a"
    opts = AuditConfig(limit_per_task=3, chunk_examples=2)

    def stop(k, rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer, on_chunk=stop)
    partial = out / "examples.partial.jsonl"
    first, second = partial.read_text().splitlines()
    partial.write_text(first + "\n" + second[:len(second) // 2])  # the second row cut in half
    run_audit(_t0(shared_data), out, opts, _data(), model=tiny_model, tokenizer=tokenizer)
    meta = json.loads((out / "audit.json").read_text())
    assert (meta["resumed"], meta["scored"]) == (1, 5)
    assert [r["index"] for r in _rows(out / "examples.jsonl")] == list(range(6))


def test_renamed_batch_tokens_names_the_new_key():
    with pytest.raises(ConfigError, match="'audit.batch_tokens' was renamed to 'audit.forward_batch_tokens'"):
        load_config(None, ["audit.batch_tokens=4096"])
    assert load_config(None, ["audit.forward_batch_tokens=4096"]).audit.forward_batch_tokens == 4096


def test_resume_refuses_other_settings(tmp_path, tiny_model, tokenizer, shared_data):
    out = tmp_path / "a"
    run_audit(_t0(shared_data), out, AuditConfig(limit_per_task=2), _data(), model=tiny_model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="different settings.*limit_per_task"):
        run_audit(_t0(shared_data), out, AuditConfig(limit_per_task=3), _data(), model=tiny_model,
                  tokenizer=tokenizer)
    run_audit(_t0(shared_data), out, AuditConfig(limit_per_task=3), _data(), overwrite=True, model=tiny_model,
              tokenizer=tokenizer)
    assert len(_rows(out / "examples.jsonl")) == 6


# ---- per-task sample, few-shot, verdicts --------------------------------------------------------------------------
def test_limit_per_task_is_a_seeded_sample_in_input_order(tmp_path, tokenizer, shared_data):
    from sftlab.audit.items import collect_items

    data = _data(task_map=str(shared_data / "t0-tasks.json"))
    files = _t0(shared_data, ("ag_news_classify.jsonl", "ag_news_recommend.jsonl"))
    a = collect_items(files, tokenizer, data, limit_per_task=5, seed=0)
    b = collect_items(files, tokenizer, data, limit_per_task=5, seed=0)
    c = collect_items(files, tokenizer, data, limit_per_task=5, seed=1)
    assert [it.source for it in a] == [it.source for it in b]
    assert [it.source for it in a] != [it.source for it in c]
    assert len(a) == 5 and {it.task for it in a} == {"ag_news"}
    order = [(it.source.rsplit(":", 1)[0], int(it.source.rsplit(":", 1)[1])) for it in a]
    assert order == sorted(order, key=lambda fl: (files.index(fl[0]), fl[1]))


def test_few_shot_prompt_holds_other_examples_of_the_task(tokenizer, shared_data):
    from sftlab.audit.items import collect_items, plan_shots
    from sftlab.data.fewshot import shot_conversation

    items = collect_items(_t0(shared_data), tokenizer, _data(), limit_per_task=4)
    plan = plan_shots(items, k=2, per_task=3, seed=0)
    by_task = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it.index)
    assert sum(1 for i in plan if items[i].task == items[0].task) == 3
    for i, shots in plan.items():
        assert len(shots) == 2 and i not in shots and all(items[j].task == items[i].task for j in shots)
        conv = shot_conversation(items[i].conv, [items[j].conv for j in shots])
        roles = [m.role for m in conv.messages]
        assert roles == ["user", "assistant"] * 3
        assert conv.messages[-1].content == items[i].reference
        assert [m.train for m in conv.messages if m.role == "assistant"][:2] == [False, False]


TH = AuditConfig(known_match=0.5, known_nll=0.5, latent_ratio=0.6)


@pytest.mark.parametrize("kw,expected", [
    (dict(s_cond=0.3, ifd=0.9), "known"),  # low s_cond
    (dict(s_cond=2.0, ifd=0.9, exact=0.8), "known"),  # greedy answers
    (dict(s_cond=2.0, ifd=0.5), "latent"),  # instruction helps a lot
    (dict(s_cond=2.0, ifd=0.9, shot_ratio=0.55), "latent"),  # shots help a lot
    (dict(s_cond=2.0, ifd=0.9, exact=0.1, shot_ratio=0.9, exact_shot=0.6), "latent"),  # shots make it answer
    (dict(s_cond=2.0, ifd=0.9, exact=0.1, shot_ratio=0.9, exact_shot=0.1), "unknown"),
    (dict(s_cond=0.5, ifd=1.2), "known"),  # boundaries are inclusive
    (dict(s_cond=2.0, ifd=0.6), "latent"),
    (dict(s_cond=0.51, ifd=0.61), "unknown"),
])
def test_verdict_rules(kw, expected):
    v, reason = verdict(kw["s_cond"], kw["ifd"], TH, kw.get("exact"), kw.get("shot_ratio"), kw.get("exact_shot"))
    assert v == expected and reason


def test_task_verdict_uses_medians_and_configurable_thresholds():
    rows = [{"task": "t", "s_cond": s, "s_uncond": 4.0, "ifd": s / 4.0, "n_response_tokens": 5}
            for s in (1.0, 2.0, 2.2, 3.0, 9.0)]  # median s_cond 2.2, median ifd 0.55
    st = task_stats(rows, TH)
    assert st["verdict"] == "latent" and "IFD 0.55" in st["reason"]
    assert st["s_cond"]["p50"] == pytest.approx(2.2) and st["s_cond"]["mean"] == pytest.approx(3.44)
    assert st["share_ifd_gt_1"] == pytest.approx(0.2)  # 9/4 > 1
    assert st["verdicts"] == {"latent": 3, "unknown": 2}
    assert task_stats(rows, AuditConfig(latent_ratio=0.5))["verdict"] == "unknown"
    assert task_stats(rows, AuditConfig(known_nll=2.5))["verdict"] == "known"
    assert example_verdict({"s_cond": 0.2, "ifd": 2.0}, TH) == "known"


# ---- CLI end to end --------------------------------------------------------------------------------------------------
def _write_t0_sample(path, shared_data, per_file=6):
    """A small prompt/completion file with two tasks, one duplicated pair (for `diverse`)."""
    lines = []
    for name in T0_FILES:
        with open(shared_data / "t0-mixture" / name, encoding="utf-8") as f:
            for _, line in zip(range(per_file), f):
                rec = json.loads(line)
                rec["task"] = name.split("_")[0]
                lines.append(rec)
    lines.append(dict(lines[0]))  # an exact duplicate of the first record
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return len(lines)


def test_cli_audit_and_select_end_to_end(tmp_path, tiny_model_dir, shared_data):
    from typer.testing import CliRunner

    from sftlab.cli import app

    data = tmp_path / "sample.jsonl"
    n = _write_t0_sample(data, shared_data)
    out = tmp_path / "audit"
    runner = CliRunner()
    res = runner.invoke(app, ["audit", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                              "--task-field", "task", "--strip", EOT_TEXT, "--few-shot", "2", "--generate",
                              "--max-new-tokens", "4", "--latent-ratio", "0.7"])
    assert res.exit_code == 0, res.output
    assert "latent: median IFD or few-shot ratio <= 0.70" in " ".join(res.output.split())
    rows = _rows(out / "examples.jsonl")
    assert len(rows) == n and [r["index"] for r in rows] == list(range(n))
    assert {r["task"] for r in rows} == {"ag", "common"}
    assert all(r["generation"] is not None and r["exact_match"] in (0.0, 1.0) for r in rows)
    assert all(isinstance(r["generation_finished"], bool) for r in rows)
    assert all(r["s_cond_shot"] is not None and r["n_shots"] == 2 for r in rows)
    sel = tmp_path / "rehearse.jsonl"
    res = runner.invoke(app, ["select", str(out), "--strategy", "self-rehearsal", "--out", str(sel)])
    assert res.exit_code == 0, res.output
    recs = _rows(sel)
    own = [r for r in recs if r["origin"] == "base_model"]
    assert len(recs) == n and "on the gold" in " ".join(res.output.split())
    assert all(r["messages"][-1]["content"] == rows[r["audit_index"]]["generation"] for r in own)
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks["tasks"]) == {"ag", "common"} and tasks["thresholds"]["latent_ratio"] == 0.7
    assert all(t["verdict"] in ("known", "latent", "unknown") for t in tasks["tasks"].values())
    assert np.load(out / "embeddings.npy").shape[0] == n

    for strategy, budget, expect in (("ifd-top", "4", None), ("drop-known", "50%", 6), ("task-balanced", "5", 5),
                                     ("diverse", "100%", n - 1)):
        sel = tmp_path / f"{strategy}.jsonl"
        res = runner.invoke(app, ["select", str(out), "--out", str(sel), "--strategy", strategy, "--budget", budget])
        assert res.exit_code == 0, res.output
        chosen = _rows(sel)
        summary = json.loads((tmp_path / f"{strategy}.summary.json").read_text())
        assert summary["kept"] == len(chosen) <= summary["budget"]
        if expect is not None:
            assert len(chosen) == expect
        if strategy == "drop-known":
            assert not {r["audit_index"] for r in chosen} & {r["index"] for r in rows if r["verdict"] == "known"}
        assert all(set(r) == {"messages", "task", "audit_index"} and r["task"] in ("ag", "common") for r in chosen)
        assert sum(t["kept"] for t in summary["tasks"].values()) == len(chosen)
        assert sum(t["available"] for t in summary["tasks"].values()) == n
    diverse = json.loads((tmp_path / "diverse.summary.json").read_text())
    assert diverse["dropped"] == {"near_duplicate": 1}
    assert n - 1 not in [r["audit_index"] for r in _rows(tmp_path / "diverse.jsonl")]  # the later copy goes


def test_cli_audit_reports_bad_record(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from sftlab.cli import app

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    res = CliRunner().invoke(app, ["audit", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    flat = "".join(res.output.split())
    assert f"{data}:2:invalidJSON" in flat
