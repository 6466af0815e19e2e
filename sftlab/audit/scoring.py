"""The audit's forward passes: per example, the sequences to score (`ScoreJob`: conditional, unconditional,
few-shot), cut into chunks of examples finished together (`ScoreChunk`), batched by length, scored by
`sftlab.lm.response_nll` (the same NLL as training and evaluation), plus greedy answers; one row per example.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import AuditConfig
from ..config import DataConfig
from ..data.packing import collate_packed, collate_padded, length_batches, pack_best_fit
from ..data.template import assistant_header
from ..data.tokenize import IGNORE, Example
from ..data.pipeline import encode_conversations
from ..lm import GEN_MARGIN, attention_as, head_matches_logits, response_nll
from ..data.fewshot import shot_conversation
from .items import AuditItem, audit_data_options, plan_shots


@dataclass
class ScoreJob:
    """One sequence to score: the mean NLL of `example`'s labelled tokens (and, if `pool`, its mean hidden state)."""

    index: int
    kind: str  # cond | uncond | shot
    example: Example
    pool: bool = False

    @property
    def tokens(self) -> int:
        return len(self.example.input_ids)


@dataclass
class ScoreChunk:
    items: list[AuditItem]
    jobs: list[ScoreJob]
    shot_items: dict[int, Example]  # index -> few-shot example (prompt with shots, same response)
    n_shots: dict[int, int]

    @property
    def tokens(self) -> int:
        return sum(j.tokens for j in self.jobs)


@dataclass
class Scorer:
    """How the audit runs the model: padding id, bf16 or not, whether the head runs on the response positions only
    (`head_only`, verified once by `check_head_only`) or on every position, and the attention of the scoring
    forwards (`attention`: `segments` on CPU where `modelcheck.scoring_attention` verified it; None: the model's own).

    dtype bf16 with bf16 weights (the audit loads them so: the training path's precision) runs as it is; with fp32
    weights (a model passed in) it runs under bf16 autocast. Either way the cross-entropy is taken in fp32."""

    model: object
    pad_id: int
    dtype: str = "fp32"
    head_only: bool | None = None
    attention: str | None = None

    @property
    def packed(self) -> bool:
        """Packed rows (no padding) where the scoring attention keeps examples apart by their positions."""
        return self.attention == "segments"

    def autocast(self):
        import torch

        param = next(self.model.parameters())
        if self.dtype == "bf16" and param.dtype == torch.float32:
            return torch.autocast(param.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scoring(self):
        """The block in which scoring forwards run: the scoring attention, and autocast where it applies."""
        with attention_as(self.model, self.attention), self.autocast():
            yield


def check_head_only(scorer: Scorer, job: ScoreJob) -> bool:
    """Whether body + head on the response positions reproduces the model's logits (fp32) on the start of
    `job`; sets `scorer.head_only` (the full forward is the fallback for models whose logits are more)."""
    ex = job.example
    start = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    n = start + min(sum(lab != IGNORE for lab in ex.labels), 8)
    scorer.head_only = head_matches_logits(scorer.model, collate_padded([Example(ex.input_ids[:n], ex.labels[:n])],
                                                                        scorer.pad_id))
    return scorer.head_only


def make_batches(jobs: list[ScoreJob], batch_tokens: int, max_batch: int, packed: bool = False
                 ) -> list[list[ScoreJob]]:
    """The forward passes of a chunk's jobs, one plan for all their kinds (cond, uncond, shot).

    packed: rows of at most `batch_tokens` tokens (best-fit, longest first; a longer sequence gets a row of its
    own), no padding. Else length-sorted right-padded batches whose size x longest sequence stays within
    `batch_tokens`, at most `max_batch` sequences (ties in index order)."""
    jobs = sorted(jobs, key=lambda j: j.index)
    lengths = [j.tokens for j in jobs]
    if packed:
        rows = pack_best_fit(lengths, max(batch_tokens, max(lengths, default=1)))
        return [[jobs[i] for i in row] for row in rows]
    return [[jobs[i] for i in b] for b in length_batches(lengths, batch_tokens, max_batch)]


def score_batch(scorer: Scorer, batch: list[ScoreJob]) -> tuple[list[float], dict[int, np.ndarray]]:
    """(mean NLL per job, {index: pooled hidden state} for the jobs that ask for it), without gradients."""
    examples = [j.example for j in batch]
    collated = collate_packed(examples) if scorer.packed else collate_padded(examples, scorer.pad_id)
    with scorer.scoring():
        res = response_nll(scorer.model, collated, pool=any(j.pool for j in batch), head_only=scorer.head_only)
    pooled = {}
    if res.pooled is not None:
        vecs = res.pooled.numpy().astype(np.float32)
        pooled = {j.index: vecs[r] for r, j in enumerate(batch) if j.pool}
    return res.means, pooled


def greedy_answers(scorer: Scorer, tokenizer, tmpl, prompts: list[list[int]], caps: list[int],
                   batch_tokens: int, max_batch: int) -> list[tuple[str, bool]]:
    """Greedy replies to token-id prompts, each with whether it ended (end-of-turn or EOS within its budget)
    rather than being cut at caps[i] new tokens.

    The decode loop keeps at most `max_batch` rows, and no more than `batch_tokens` over the longest row
    (prompt + budget) would fill."""
    from ..generate import Decoding, generate_ids, split_reply, stop_markers

    if not prompts:
        return []
    longest = max(len(p) + c for p, c in zip(prompts, caps))
    rows = max(1, min(max_batch, batch_tokens // longest))
    with scorer.autocast():
        new = generate_ids(scorer.model, tokenizer, tmpl, prompts, caps, Decoding(max(caps)), rows)
    stops = stop_markers(tmpl, tokenizer)
    return [split_reply(ids[:cap], tokenizer, stops) for ids, cap in zip(new, caps)]


def build_chunks(pending: list[AuditItem], all_items: list[AuditItem], tokenizer, tmpl, data: DataConfig,
                 cfg: AuditConfig) -> list[ScoreChunk]:
    """Pending items sorted by length and cut into chunks; each chunk's cond/uncond/shot jobs."""
    header_ids = tokenizer(assistant_header(tmpl), add_special_tokens=False).input_ids
    shot_plan = plan_shots(all_items, cfg.few_shot, cfg.few_shot_per_task, cfg.seed)
    pending = sorted(pending, key=lambda it: (len(it.example.input_ids), it.index))
    tok_opts = audit_data_options(data)
    chunks = []
    for start in range(0, len(pending), cfg.chunk_examples):
        part = pending[start:start + cfg.chunk_examples]
        jobs, shot_examples, n_shots = [], {}, {}
        for it in part:
            a, b = it.response
            response = it.example.input_ids[a:b]
            jobs.append(ScoreJob(it.index, "cond", it.example, pool=True))
            jobs.append(ScoreJob(it.index, "uncond",
                                 Example(header_ids + response, [IGNORE] * len(header_ids) + response)))
        targets = [it for it in part if it.index in shot_plan]
        convs = [shot_conversation(it.conv, [all_items[j].conv for j in shot_plan[it.index]]) for it in targets]
        for it, (_, res) in zip(targets, encode_conversations(convs, tokenizer, tmpl, tok_opts)):
            if isinstance(res, Example):
                jobs.append(ScoreJob(it.index, "shot", res))
                shot_examples[it.index] = res
                n_shots[it.index] = len(shot_plan[it.index])
        chunks.append(ScoreChunk(part, jobs, shot_examples, n_shots))
    return chunks


def _ratio(a, b):
    return a / b if a is not None and b else None


def _answers(chunk: ScoreChunk, scorer: Scorer, tokenizer, tmpl, cfg: AuditConfig) -> dict:
    """{(index, "generation" | "generation_shot"): greedy answer} for the chunk's items."""
    prompts, caps, keys = [], [], []
    for it in chunk.items:
        a, b = it.response
        cap = min(cfg.max_new_tokens, b - a + GEN_MARGIN)
        prompts.append(it.example.input_ids[:a])
        caps.append(cap)
        keys.append((it.index, "generation"))
        if it.index in chunk.shot_items:
            ex = chunk.shot_items[it.index]
            prompts.append(ex.input_ids[:next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)])
            caps.append(cap)
            keys.append((it.index, "generation_shot"))
    answers = greedy_answers(scorer, tokenizer, tmpl, prompts, caps, cfg.forward_batch_tokens, cfg.max_batch_size)
    return dict(zip(keys, answers))


def run_chunk(chunk: ScoreChunk, scorer: Scorer, tokenizer, tmpl, cfg: AuditConfig,
              on_tokens: Callable[[int], None] | None = None) -> tuple[list[dict], dict[int, np.ndarray]]:
    """Every job of the chunk scored (and answers generated): (one examples.jsonl row per item, embeddings)."""
    from ..evaluate.metrics import exact_match, rouge_l

    values: dict = defaultdict(dict)
    pooled: dict[int, np.ndarray] = {}
    for batch in make_batches(chunk.jobs, cfg.forward_batch_tokens, cfg.max_batch_size, scorer.packed):
        means, emb = score_batch(scorer, batch)
        pooled.update(emb)
        for job, v in zip(batch, means):
            values[job.index][job.kind] = v
        if on_tokens:
            on_tokens(sum(j.tokens for j in batch))
    gens = _answers(chunk, scorer, tokenizer, tmpl, cfg) if cfg.generate else {}
    rows = []
    for it in chunk.items:
        v = values[it.index]
        a, b = it.response
        row = {"index": it.index, "source": it.source, "task": it.task, "key": it.key,
               "messages": it.conv.as_dicts(with_train=True), "n_tokens": len(it.example.input_ids),
               "n_response_tokens": b - a, "truncated": it.example.truncated,
               "s_cond": v["cond"], "s_uncond": v["uncond"], "ifd": _ratio(v["cond"], v["uncond"])}
        if cfg.few_shot:
            row.update(n_shots=chunk.n_shots.get(it.index, 0), s_cond_shot=v.get("shot"),
                       shot_ratio=_ratio(v.get("shot"), v["uncond"]))
        if cfg.generate:
            g, finished = gens[(it.index, "generation")]
            row.update(generation=g, generation_finished=finished, exact_match=float(exact_match(g, it.reference)),
                       rouge_l=float(rouge_l(g, it.reference)))
            if cfg.few_shot:
                gs, _ = gens.get((it.index, "generation_shot"), (None, None))
                row.update(generation_shot=gs,
                           exact_match_shot=None if gs is None else float(exact_match(gs, it.reference)))
        rows.append(row)
    return rows, pooled
