"""`sftlab select` strategies on a hand-built audit directory (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from sftlab.select import k_center_greedy, near_duplicates, parse_budget, run_select, select

QUIET = Console(quiet=True)


def _row(i, task, ifd, verdict="unknown", text=None):
    text = text or f"question {i} about {task} with words w{i} x{i} y{i} z{i}"
    return {"index": i, "task": task, "source": f"f.jsonl:{i + 1}", "key": str(i), "ifd": ifd,
            "s_cond": 2.0, "s_uncond": 2.0 / ifd if ifd else None, "verdict": verdict, "n_response_tokens": 3,
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture
def audit_dir(tmp_path):
    """Task a: 6 examples (0-5), b: 3 (6-8), c: 2 (9-10, task verdict known).
    Near-duplicates: 1 repeats 0 with one word changed; 4 repeats 3 exactly.
    Embeddings: three tight clusters, {0,1,2,3,4,5} around e0 (with 5 far out on e3), {6,7,8} e1, {9,10} e2."""
    long = "please summarise the following news article about the local football club winning the cup final"
    rows = [_row(0, "a", 0.90, text=long), _row(1, "a", 0.80, text=long + " today"),
            _row(2, "a", 0.70, "known"), _row(3, "a", 1.20, text="translate this sentence into french please now"),
            _row(4, "a", 0.95, text="translate this sentence into french please now"), _row(5, "a", 0.40),
            _row(6, "b", 0.99), _row(7, "b", 0.60), _row(8, "b", 0.50),
            _row(9, "c", 0.30), _row(10, "c", 0.20)]
    emb = np.zeros((11, 4), dtype=np.float32)
    rng = np.random.default_rng(0)
    for i, axis in enumerate([0, 0, 0, 0, 0, 3, 1, 1, 1, 2, 2]):
        emb[i, axis] = 1.0
        emb[i] += rng.normal(0, 0.01, 4)
    tasks = {"tasks": {"a": {"verdict": "latent"}, "b": {"verdict": "unknown"}, "c": {"verdict": "known"}}}
    d = tmp_path / "audit"
    d.mkdir()
    (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tasks.json").write_text(json.dumps(tasks))
    np.save(d / "embeddings.npy", emb)
    return d


def _indices(chosen):
    return [r["index"] for r in chosen]


def test_parse_budget():
    assert parse_budget("7", 100) == 7
    assert parse_budget("10%", 55) == 5
    assert parse_budget("100%", 55) == 55
    assert parse_budget("0.5%", 10) == 1
    for bad in ("0", "-3", "abc", "150%", "0%"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad, 100)


def test_ifd_top_ranks_below_one(audit_dir):
    chosen, summary = select(audit_dir, "ifd-top", "4")
    assert set(_indices(chosen)) == {6, 4, 0, 1}  # the four highest IFDs below 1 (3 has IFD 1.2)
    assert _indices(chosen) == [0, 1, 4, 6]  # written in input order
    assert summary["dropped"] == {"ifd_ge_1": 1, "budget": 6}
    assert summary["tasks"]["a"] == {"available": 6, "kept": 3, "dropped": {"budget": 2, "ifd_ge_1": 1}}


def test_drop_known(audit_dir):
    chosen, summary = select(audit_dir, "drop-known", "100%")
    assert _indices(chosen) == [0, 1, 3, 4, 5, 6, 7, 8]  # example 2 (known) and task c (known) dropped
    assert summary["dropped"] == {"known": 3}
    small, _ = select(audit_dir, "drop-known", "3", seed=1)
    assert len(small) == 3 and set(_indices(small)) <= {0, 1, 3, 4, 5, 6, 7, 8}
    again, _ = select(audit_dir, "drop-known", "3", seed=1)
    assert _indices(again) == _indices(small)


def test_task_balanced(audit_dir):
    chosen, summary = select(audit_dir, "task-balanced", "6")
    assert {t: s["kept"] for t, s in summary["tasks"].items()} == {"a": 2, "b": 2, "c": 2}
    chosen, summary = select(audit_dir, "task-balanced", "9")  # c has only 2: its share goes to a and b
    assert {t: s["kept"] for t, s in summary["tasks"].items()} == {"a": 4, "b": 3, "c": 2}
    assert len(chosen) == 9


def test_diverse_drops_near_duplicates_and_spreads(audit_dir):
    chosen, summary = select(audit_dir, "diverse", "4", dup_threshold=0.7)
    assert summary["dropped"]["near_duplicate"] == 2  # 1 (near copy of 0) and 4 (copy of 3)
    assert 1 not in _indices(chosen) and 4 not in _indices(chosen)
    clusters = {0: "e0", 2: "e0", 3: "e0", 5: "e3", 6: "e1", 7: "e1", 8: "e1", 9: "e2", 10: "e2"}
    assert len(chosen) == 4 and {clusters[i] for i in _indices(chosen)} == {"e0", "e1", "e2", "e3"}


def test_near_duplicates_and_k_center_units():
    texts = ["the cat sat on the mat today", "the cat sat on the mat today!", "a completely different line of text"]
    assert near_duplicates(texts, threshold=0.8) == {1: 0}
    x = np.array([[1, 0], [0.99, 0.01], [0, 1], [-1, 0]], dtype=np.float32)
    picked = k_center_greedy(x, 3)
    assert len(picked) == 3 and {2, 3} <= set(picked) and len({0, 1} & set(picked)) == 1
    assert k_center_greedy(x, 10) == [0, 1, 2, 3]


def test_run_select_writes_messages_readable_by_the_data_layer(audit_dir, tmp_path):
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import iter_conversations

    out = tmp_path / "train.jsonl"
    summary = run_select(audit_dir, out, "task-balanced", "50%", QUIET, table=QUIET)
    assert summary["budget"] == 5 and summary["kept"] == 5
    convs = list(iter_conversations([out], DataConfig(task_field="task")))
    assert len(convs) == 5 and {c.task for c in convs} <= {"a", "b", "c"}
    assert all(c.messages[-1].role == "assistant" for c in convs)
    saved = json.loads((tmp_path / "train.summary.json").read_text())
    assert saved["strategy"] == "task-balanced" and saved["out"] == str(out)


def test_select_errors(audit_dir, tmp_path):
    with pytest.raises(ValueError, match="--strategy"):
        select(audit_dir, "best", "3")
    with pytest.raises(FileNotFoundError, match="no examples.jsonl"):
        select(tmp_path, "ifd-top", "3")
    (audit_dir / "embeddings.npy").unlink()
    with pytest.raises(FileNotFoundError, match="embeddings"):
        select(audit_dir, "diverse", "3")


# ---- self-rehearsal ------------------------------------------------------------------------------------------------
def _rehearsal_audit(tmp_path, with_generations=True):
    """Five examples: 0 base answer equals gold up to case/punctuation; 1 close (ROUGE-L 0.8) but not equal;
    2 wrong; 3 equal but cut at the token budget; 4 equal but its gold turn carries tool calls."""
    gold = ["Paris", "the cat sat on the mat", "42", "a long answer", "call it"]
    gens = ["paris.", "the cat sat on a mat", "41", "a long answer", "call it"]
    rouge = [1.0, 0.8333, 0.0, 1.0, 1.0]
    rows = []
    for i, (g, a, r) in enumerate(zip(gold, gens, rouge)):
        last = {"role": "assistant", "content": g}
        if i == 4:
            last["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
        row = {"index": i, "task": "t", "source": f"f.jsonl:{i + 1}", "key": str(i), "ifd": 0.5, "verdict": "latent",
               "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"earlier {i}"},
                            {"role": "user", "content": f"again {i}"}, last]}
        if with_generations:
            row.update(generation=a, generation_finished=i != 3, exact_match=float(i in (0, 3, 4)), rouge_l=r)
        rows.append(row)
    d = tmp_path / ("audit" if with_generations else "audit-nogen")
    d.mkdir()
    (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tasks.json").write_text(json.dumps({"tasks": {"t": {"verdict": "latent"}}}))
    return d


def test_self_rehearsal_trains_on_the_base_answer_only_where_it_already_matches(tmp_path):
    d = _rehearsal_audit(tmp_path)
    out = tmp_path / "sel.jsonl"
    summary = run_select(d, out, "self-rehearsal", None, QUIET, table=QUIET)
    recs = [json.loads(line) for line in out.open()]
    assert [r["audit_index"] for r in recs] == [0, 1, 2, 3, 4]  # every example kept, in input order
    assert [r["origin"] for r in recs] == ["base_model", "gold", "gold", "gold", "gold"]
    assert recs[0]["messages"][-1]["content"] == "paris." and recs[0]["gold_response"] == "Paris"
    assert recs[0]["messages"][:3] == [{"role": "user", "content": "q0"},  # earlier turns untouched
                                       {"role": "assistant", "content": "earlier 0"},
                                       {"role": "user", "content": "again 0"}]
    assert recs[1]["messages"][-1]["content"] == "the cat sat on the mat" and "gold_response" not in recs[1]
    assert (summary["rehearsed"], summary["gold"]) == (1, 4) and summary["tasks"]["t"]["rehearsed"] == 1
    # with a ROUGE-L threshold the close answer is rehearsed too; the cut and the tool-call one never are
    chosen, s = select(d, "self-rehearsal", "100%", rehearsal_rouge=0.8)
    assert [r["origin"] for r in chosen] == ["base_model", "base_model", "gold", "gold", "gold"]
    assert chosen[1]["messages"][-1]["content"] == "the cat sat on a mat" and s["rehearsed"] == 2


def test_self_rehearsal_output_trains_as_messages_data(tmp_path, tokenizer):
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import iter_examples

    d = _rehearsal_audit(tmp_path)
    out = tmp_path / "sel.jsonl"
    run_select(d, out, "self-rehearsal", None, QUIET, table=QUIET)
    exs = list(iter_examples([str(out)], tokenizer, DataConfig(format="messages", task_field="task",
                                                               skip_invalid=True)))  # 4: tool calls
    trained = tokenizer.decode([t for t in exs[0].labels if t != -100])
    assert "paris." in trained and "Paris" not in trained and "earlier 0" in trained  # every assistant turn


def test_self_rehearsal_needs_the_audit_answers(tmp_path):
    d = _rehearsal_audit(tmp_path, with_generations=False)
    with pytest.raises(ValueError, match="--generate"):
        select(d, "self-rehearsal", None)
    with pytest.raises(ValueError, match="--rehearsal-rouge"):
        select(_rehearsal_audit(tmp_path), "self-rehearsal", None, rehearsal_rouge=1.5)
