"""Choose a training set from an audit directory (`sftlab audit`): four strategies under one budget.

- `ifd-top`: the examples with the highest IFD among those with IFD < 1 (Cherry LLM: IFD >= 1 means the
  instruction does not help, a sign of a misaligned pair, so those are dropped, not ranked).
- `drop-known`: drop what the base model already knows (examples whose own verdict is `known`, and every
  example of a task whose verdict is `known`), then a seeded uniform sample of the rest.
- `task-balanced`: the budget spread evenly over tasks (round robin; a task with fewer examples gives
  its share to the others), each task's examples in seeded random order.
- `self-rehearsal` (Gupta et al. 2024, arXiv 2409.04787, "selective self-rehearsal"): every example is kept (a
  seeded sample under a budget below 100 %); where the base model's own greedy answer from the audit (`sftlab audit
  --generate`) already matches the gold response — normalised exact match, or ROUGE-L F >= `rehearsal_rouge` when
  given — and ended within its budget, the last assistant turn is trained on that answer instead of the gold one
  (`"origin": "base_model"`, the gold text kept in `"gold_response"`); the others on the gold (`"origin": "gold"`).
  The answers come from the same prompt training teaches (the conversation up to the last assistant turn), so the
  model is taught its own phrasing of what it already gets right and the gold one only where it does not. A last
  assistant turn with tool calls or a reasoning trace is always kept gold.
- `diverse`: near-duplicates removed first (MinHash over word 3-grams of the conversation text, LSH at
  Jaccard >= `dup_threshold`; the earliest example of each group is kept), then k-center greedy over the
  base model's mean-pooled hidden states (`embeddings.npy`, cosine distance), starting from the example
  nearest the centroid and repeatedly adding the one farthest from everything chosen.

The budget is N examples or P% of the audited examples (none: all of them); no strategy keeps more. The output is JSONL in
the `messages` format (`{"messages": [...], "task": ..., "audit_index": i}`, input order), readable by
`sftlab data` / training with `--task-field task`; `FILE.summary.json` holds, per task, how many were
available, kept, and dropped for which reason (`known`, `ifd_ge_1`, `near_duplicate`, `budget`).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import layout
from .io import atomic_write, read_jsonl, table_console

STRATEGIES = ("ifd-top", "drop-known", "task-balanced", "diverse", "self-rehearsal")


def parse_budget(text: str | int | None, total: int) -> int:
    """'N' -> N, 'P%' -> floor(P% of total); at least 1; None -> total."""
    if text is None:
        return max(total, 1)
    s = str(text).strip()
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            n = max(1, math.floor(total * pct / 100 + 1e-9))
        else:
            n = int(s)
    except ValueError:
        raise ValueError(f"--budget {text!r}: expected a number of examples (e.g. 500) or a percentage in (0, 100] "
                         "(e.g. 10%)") from None
    if n < 1:
        raise ValueError(f"--budget {text!r}: keeps no example of {total}")
    return n


def load_audit(audit_dir: str | Path) -> tuple[list[dict], dict]:
    """(example rows in index order, tasks.json) of a finished audit."""
    d = Path(audit_dir)
    for name in ("examples.jsonl", "tasks.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: no {name}; run `sftlab audit ... --out {d}` to completion first")
    rows = read_jsonl(d / "examples.jsonl")
    for lineno, row in enumerate(rows, start=1):
        if "messages" not in row or "index" not in row:
            raise ValueError(f"{d / 'examples.jsonl'}:{lineno}: not an audit row (no messages/index)")
    rows.sort(key=lambda r: r["index"])
    return rows, json.loads((d / "tasks.json").read_text(encoding="utf-8"))


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out


# ---- strategies: rows -> (chosen rows, {index: drop reason}) --------------------------------------------------
def select_ifd_top(rows: list[dict], budget: int) -> tuple[list[dict], dict[int, str]]:
    dropped = {r["index"]: "ifd_ge_1" for r in rows if r.get("ifd") is None or r["ifd"] >= 1}
    ranked = sorted((r for r in rows if r["index"] not in dropped), key=lambda r: (-r["ifd"], r["index"]))
    dropped.update({r["index"]: "budget" for r in ranked[budget:]})
    return ranked[:budget], dropped


def select_drop_known(rows: list[dict], tasks: dict, budget: int, seed: int = 0) -> tuple[list[dict], dict[int, str]]:
    known_tasks = {t for t, s in tasks.get("tasks", {}).items() if s.get("verdict") == "known"}
    dropped = {r["index"]: "known" for r in rows if r.get("verdict") == "known" or str(r["task"]) in known_tasks}
    rest = _shuffled([r for r in rows if r["index"] not in dropped], seed)
    dropped.update({r["index"]: "budget" for r in rest[budget:]})
    return rest[:budget], dropped


def select_task_balanced(rows: list[dict], budget: int, seed: int = 0) -> tuple[list[dict], dict[int, str]]:
    by_task: dict = defaultdict(list)
    for r in rows:
        by_task[str(r["task"])].append(r)
    queues = {t: _shuffled(rs, seed) for t, rs in sorted(by_task.items())}
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < budget and any(len(q) > depth for q in queues.values()):
        for q in queues.values():  # one more from every task that still has one, in task-name order
            if len(q) > depth and len(chosen) < budget:
                chosen.append(q[depth])
        depth += 1
    kept = {r["index"] for r in chosen}
    return chosen, {r["index"]: "budget" for r in rows if r["index"] not in kept}


def rehearsable(row: dict, rouge_threshold: float | None) -> bool:
    """The base model's audit answer may replace the gold last turn: it matches the gold (exact match, or ROUGE-L
    >= rouge_threshold), ended within its budget, is not empty, and the gold turn is plain text."""
    gen = row.get("generation")
    last = next((m for m in reversed(row["messages"]) if m["role"] == "assistant"), None)
    if not gen or not gen.strip() or row.get("generation_finished") is False or last is None:
        return False
    if set(last) - {"role", "content", "train"}:  # tool calls, a reasoning trace, tool fields: keep the gold
        return False
    return bool(row.get("exact_match")) or (rouge_threshold is not None and (row.get("rouge_l") or 0.0)
                                            >= rouge_threshold)


def select_self_rehearsal(rows: list[dict], budget: int, seed: int = 0, rouge_threshold: float | None = None
                          ) -> tuple[list[dict], dict[int, str], set[int]]:
    """Every example (a seeded sample of `budget` when fewer), and the indices whose base answer is rehearsed."""
    if not any("generation" in r for r in rows):
        raise ValueError("self-rehearsal needs the base model's answers: the audit has none (run sftlab audit with "
                         "--generate, or audit.generate: true in sftlab run)")
    chosen = rows if budget >= len(rows) else _shuffled(rows, seed)[:budget]
    kept = {r["index"] for r in chosen}
    rehearsed = {r["index"] for r in chosen if rehearsable(r, rouge_threshold)}
    return chosen, {r["index"]: "budget" for r in rows if r["index"] not in kept}, rehearsed


def rehearsed_row(row: dict) -> dict:
    """The audit row with its last assistant turn replaced by the base model's own answer."""
    messages = [dict(m) for m in row["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    gold = messages[last]["content"]
    messages[last]["content"] = row["generation"]
    return {**row, "messages": messages, "origin": "base_model", "gold_response": gold}


def conversation_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] != "system")


def _shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else {""}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, on_item=None) -> dict[int, int]:
    """{i: j} for every text i that is a near-duplicate (MinHash Jaccard >= threshold) of an earlier kept text j."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dup: dict[int, int] = {}
    for i, text in enumerate(texts):
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch([s.encode("utf-8") for s in _shingles(text)])
        hits = lsh.query(mh)
        if hits:
            dup[i] = min(hits)
        else:
            lsh.insert(i, mh)
        if on_item:
            on_item()
    return dup


def k_center_greedy(x: np.ndarray, k: int, on_pick=None) -> list[int]:
    """k row indices of `x` spread out in cosine distance: start nearest the centroid, then farthest-first."""
    if k >= len(x):
        return list(range(len(x)))
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroid = x.mean(0)
    first = int(np.argmax(x @ centroid))
    chosen = [first]
    dist = 1.0 - x @ x[first]
    dist[first] = -np.inf
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])  # chosen ones stay at -inf
        dist[nxt] = -np.inf
        if on_pick:
            on_pick()
    return chosen


def select_diverse(rows: list[dict], embeddings: np.ndarray, budget: int, threshold: float = 0.8,
                   progress: Progress | None = None) -> tuple[list[dict], dict[int, str]]:
    if len(embeddings) != len(rows):
        raise ValueError(f"embeddings.npy has {len(embeddings)} rows for {len(rows)} examples; rerun the audit")
    tick = None
    if progress is not None:
        bar = progress.add_task("near-duplicates", total=len(rows), info="near-duplicates")
        tick = lambda: progress.advance(bar)  # noqa: E731
    dup = near_duplicates([conversation_text(r) for r in rows], threshold, on_item=tick)
    dropped = {rows[i]["index"]: "near_duplicate" for i in dup}
    keep = [i for i in range(len(rows)) if i not in dup]
    if progress is not None:
        bar = progress.add_task("k-center", total=max(min(budget, len(keep)) - 1, 0), info="k-center")
        tick = lambda: progress.advance(bar)  # noqa: E731
    picked = k_center_greedy(embeddings[keep], budget, on_pick=tick)
    chosen = [rows[keep[j]] for j in picked]
    kept = {r["index"] for r in chosen}
    dropped.update({rows[i]["index"]: "budget" for i in keep if rows[i]["index"] not in kept})
    return chosen, dropped


# ---- the command -------------------------------------------------------------------------------------------------
def summarise_selection(rows: list[dict], chosen: list[dict], dropped: dict[int, str]) -> dict:
    tasks: dict = defaultdict(lambda: {"available": 0, "kept": 0, "dropped": Counter()})
    kept = {r["index"] for r in chosen}
    for r in rows:
        t = tasks[str(r["task"])]
        t["available"] += 1
        if r["index"] in kept:
            t["kept"] += 1
        else:
            t["dropped"][dropped.get(r["index"], "budget")] += 1
    return {t: {**v, "dropped": dict(v["dropped"])} for t, v in sorted(tasks.items())}


def output_record(row: dict) -> dict:
    """What a selection file holds of a chosen row (self-rehearsal: also `origin` and `gold_response`)."""
    return {"messages": row["messages"], "task": row["task"], "audit_index": row["index"],
            **{k: row[k] for k in ("origin", "gold_response") if k in row}}


def select(audit_dir: str | Path, strategy: str, budget: str | int | None, seed: int = 0, dup_threshold: float = 0.8,
           progress: Progress | None = None, rehearsal_rouge: float | None = None) -> tuple[list[dict], dict]:
    """(chosen rows in input order, summary) — the Python API behind `sftlab select`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 0 < dup_threshold <= 1:
        raise ValueError(f"--dup-threshold {dup_threshold}: must be in (0, 1]")
    if rehearsal_rouge is not None and not 0 < rehearsal_rouge <= 1:
        raise ValueError(f"--rehearsal-rouge {rehearsal_rouge}: must be in (0, 1]")
    rows, tasks = load_audit(audit_dir)
    n = parse_budget(budget, len(rows))
    rehearsed: set[int] = set()
    if strategy == "self-rehearsal":
        chosen, dropped, rehearsed = select_self_rehearsal(rows, n, seed, rehearsal_rouge)
    elif strategy == "ifd-top":
        chosen, dropped = select_ifd_top(rows, n)
    elif strategy == "drop-known":
        chosen, dropped = select_drop_known(rows, tasks, n, seed)
    elif strategy == "task-balanced":
        chosen, dropped = select_task_balanced(rows, n, seed)
    else:
        npy = Path(audit_dir) / layout.AUDIT_EMBEDDINGS
        if not npy.is_file():
            raise FileNotFoundError(f"{npy}: missing; the diverse strategy needs the audit's embeddings")
        chosen, dropped = select_diverse(rows, np.load(npy), n, dup_threshold, progress)
    chosen = sorted(chosen, key=lambda r: r["index"])
    summary = {"audit_dir": str(audit_dir), "strategy": strategy, "budget": n, "budget_arg": str(budget),
               "seed": seed, "available": len(rows), "kept": len(chosen),
               "dropped": dict(Counter(dropped.values())), "tasks": summarise_selection(rows, chosen, dropped)}
    if strategy == "diverse":
        summary["dup_threshold"] = dup_threshold
    if strategy == "self-rehearsal":
        summary["rehearsal_rouge"] = rehearsal_rouge
        summary["rehearsed"] = len(rehearsed)  # trained on the base model's own answer
        summary["gold"] = len(chosen) - len(rehearsed)
        for r in chosen:
            t = summary["tasks"][str(r["task"])]
            key = "rehearsed" if r["index"] in rehearsed else "gold"
            t[key] = t.get(key, 0) + 1
        chosen = [rehearsed_row(r) if r["index"] in rehearsed else {**r, "origin": "gold"} for r in chosen]
    return chosen, summary


def print_selection(summary: dict, console: Console) -> None:
    t = Table(title=f"sftlab select: {summary['strategy']}, budget {summary['budget']:,}")
    rehearsal = "rehearsed" in summary
    cols = ("task", "available", "kept") + (("own answer", "gold") if rehearsal else ()) + ("dropped",)
    for col in cols:
        t.add_column(col, justify="left" if col in ("task", "dropped") else "right")
    for task, s in summary["tasks"].items():
        extra = (f"{s.get('rehearsed', 0):,}", f"{s.get('gold', 0):,}") if rehearsal else ()
        t.add_row(task, f"{s['available']:,}", f"{s['kept']:,}", *extra,
                  ", ".join(f"{k} {v:,}" for k, v in sorted(s["dropped"].items())) or "-")
    console.print(t)


def run_select(audit_dir: str | Path, out: str | Path, strategy: str, budget: str | int | None,
               console: Console | None = None, seed: int = 0, dup_threshold: float = 0.8,
               table: Console | None = None, rehearsal_rouge: float | None = None) -> dict:
    from .io import progress

    console = console or Console(stderr=True)
    out = Path(out)
    with progress("select", console) as bars:
        chosen, summary = select(audit_dir, strategy, budget, seed, dup_threshold, bars, rehearsal_rouge)
    with atomic_write(out) as f:
        for r in chosen:
            f.write(json.dumps(output_record(r), ensure_ascii=False) + "\n")
    summary["out"] = str(out)
    with atomic_write(layout.selection_summary(out)) as f:
        json.dump(summary, f, indent=2)
    print_selection(summary, table or (Console(quiet=True) if console.quiet else table_console()))
    drops = ", ".join(f"{v:,} {k}" for k, v in sorted(summary["dropped"].items())) or "none"
    n_tasks = sum(1 for s in summary["tasks"].values() if s["kept"])
    own = (f"; {summary['rehearsed']:,} trained on the base model's own answer, {summary['gold']:,} on the gold"
           if "rehearsed" in summary else "")
    console.print(f"[green]done[/] kept {summary['kept']:,} of {summary['available']:,} examples "
                  f"({strategy}, budget {summary['budget']:,}) in {n_tasks} of {len(summary['tasks'])} tasks; "
                  f"dropped {drops}{own} -> {out}", highlight=False)
    return summary
