"""The examples to audit: the data chain (read -> normalise -> render -> tokenize+mask -> triage) with the
audit's tokenize options, a seeded per-task sample, and the few-shot prompts built from other examples."""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ..data.formats import Conversation
from ..config import DataConfig
from ..data.pipeline import DataReport, encode_conversations, iter_conversations, keep_examples
from ..data.template import resolve_template
from ..data.tokenize import IGNORE, Example, protected_pattern


@dataclass
class AuditItem:
    """One audited example: its position among the audited ones, where it came from, and its tokens."""

    index: int
    source: str
    task: str | None
    conv: Conversation
    example: Example
    key: str

    @property
    def response(self) -> tuple[int, int]:
        """[start, end) of the scored response tokens in `example.input_ids`."""
        pos = [i for i, lab in enumerate(self.example.labels) if lab != IGNORE]
        return pos[0], pos[-1] + 1

    @property
    def reference(self) -> str:
        return [m for m in self.conv.messages if m.role == "assistant"][-1].content


def audit_data_options(data: DataConfig) -> DataConfig:
    """The data options the audit scores with: only the last assistant turn, prompt tokens unweighted."""
    return data.model_copy(update={"loss_on": "last_assistant", "prompt_loss_weight": 0.0})


def conversation_key(conv: Conversation) -> str:
    blob = json.dumps([conv.task, conv.as_dicts(with_train=True)], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def _rank(seed: int, *parts) -> bytes:
    return hashlib.blake2b("\x00".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()


def sample_per_task(convs, limit: int | None, seed: int) -> list[Conversation]:
    """A seeded uniform sample of at most `limit` conversations per task (bottom-k by hash), in input order."""
    if limit is None:
        return list(convs)
    heaps: dict = defaultdict(list)
    for order, conv in enumerate(convs):
        # max-heap on the rank (negated bytes ordering via inversion) keeps the `limit` smallest ranks
        r = _rank(seed, conv.where)
        inv = bytes(255 - b for b in r)
        h = heaps[conv.task]
        if len(h) < limit:
            heapq.heappush(h, (inv, order, conv))
        elif inv > h[0][0]:
            heapq.heapreplace(h, (inv, order, conv))
    chosen = [(order, conv) for h in heaps.values() for _, order, conv in h]
    return [conv for _, conv in sorted(chosen, key=lambda oc: oc[0])]


def collect_items(inputs: list, tokenizer, data: DataConfig, limit_per_task: int | None = None, seed: int = 0,
                  report: DataReport | None = None, on_record: Callable[[], None] | None = None) -> list[AuditItem]:
    """Read, normalise, (sample,) render and tokenize: the examples to audit, in input order."""
    data = audit_data_options(data)
    report = report if report is not None else DataReport()
    tmpl = resolve_template(data.template, tokenizer)
    protected = protected_pattern(tokenizer)
    convs = sample_per_task(iter_conversations(inputs, data, report, protected.findall, on_record),
                            limit_per_task, seed)
    encoded = encode_conversations(convs, tokenizer, tmpl, data, protected)
    items = [AuditItem(i, str(conv.where), conv.task, conv, ex, conversation_key(conv))
             for i, (conv, ex) in enumerate(keep_examples(encoded, data.skip_invalid, report))]
    if limit_per_task is not None:  # the report's per-task counts describe what is audited
        report.tasks = Counter(it.task for it in items)
    return items


def plan_shots(items: list[AuditItem], k: int, per_task: int, seed: int) -> dict[int, list[int]]:
    """index -> the indices of its k shots, for up to `per_task` examples per task (seeded order); the pool
    of shots per task is its first k+1 examples in that order, so each target uses k others."""
    if k <= 0 or per_task <= 0:
        return {}
    by_task: dict = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    plan = {}
    for task_items in by_task.values():
        ordered = sorted(task_items, key=lambda it: (_rank(seed, "shot", it.key), it.index))
        pool = [it.index for it in ordered[:k + 1]]
        for it in ordered[:per_task]:
            shots = [j for j in pool if j != it.index][:k]
            if shots:
                plan[it.index] = shots
    return plan
