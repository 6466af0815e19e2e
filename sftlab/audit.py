"""Knowledge audit: per example and per task, how much of each response the base model already holds.

Definitions (all NLLs are natural-log cross-entropy in fp32, mean over the scored tokens; the logits at
position t-1 predict token t; token ids are the rendered template text tokenized without added special
tokens, exactly as `sftlab.data` tokenizes for training):

- response tokens: the LAST assistant turn's content plus its end-of-turn marker (ChatML `<|im_end|>`),
  i.e. the labels != -100 of the example built with `loss_on="last_assistant"`. For single-turn data this
  is exactly what training trains; for multi-turn data earlier turns are context.
- `s_cond`: mean NLL of the response tokens given everything rendered before them (system prompt,
  earlier turns, user turn, assistant header), truncated from the left only if `--max-length` demands.
- `s_uncond`: mean NLL of the same response token ids given only the template's assistant header
  (`assistant_header`, ChatML `<|im_start|>assistant\\n`) and nothing before it.
- `ifd = s_cond / s_uncond` (Instruction-Following Difficulty, Li et al. 2024, "From Quantity to
  Quality"): below 1 the instruction makes the answer more likely; above 1 it does not help.
- few-shot baseline (`--few-shot K`): K other examples of the same task as earlier user/assistant turns
  before the prompt; `s_cond_shot` is s_cond with them, `shot_ratio = s_cond_shot / s_uncond`.
- with `--generate`: the greedy answer (at most min(max_new_tokens, n_response_tokens + 16) tokens,
  stopped at end-of-turn) and its normalised exact match and ROUGE-L F against the reference.

Verdicts (thresholds in `Thresholds`, printed with every table, see docs/audit.md), per task:
`known` if greedy exact match >= known_match or median s_cond <= known_nll; else `latent` if median ifd
<= latent_ratio, median shot_ratio <= latent_ratio, or few-shot exact match >= known_match; else
`unknown`. Per example the same rules apply to the example's own numbers.

Files in the audit directory:

- `examples.jsonl`: one object a line in input order: `index` (0-based position among audited
  examples), `source` (file:line), `task`, `key` (hash of the conversation), `messages` (the normalised
  conversation: role, content, train when set), `n_tokens`, `n_response_tokens`, `truncated`, `s_cond`,
  `s_uncond`, `ifd`, `verdict`; with few-shot (for up to `few_shot_per_task` examples per task):
  `n_shots`, `s_cond_shot`, `shot_ratio`; with `--generate`: `generation`, `exact_match`, `rouge_l`,
  and with shots `generation_shot`, `exact_match_shot` (fields not measured are null).
- `embeddings.npy`: float32 [n_examples, hidden]: the base model's last hidden state (after its final
  norm) mean-pooled over all tokens of the conditional sequence; row i belongs to `index` i.
- `tasks.json`: `{"thresholds", "few_shot", "tasks": {task: stats}, "overall": stats}`; stats hold `n`,
  `n_response_tokens` (mean), `s_cond`/`s_uncond`/`ifd` as {mean, p10, p25, p50, p75, p90}, `share_ifd_gt_1`,
  `n_shot`, `s_cond_shot`, `shot_ratio` (median), `exact_match`, `rouge_l`, `exact_match_shot` (means or
  null), `verdict`, `reason`, and `verdicts` (per-example verdict counts).
- `audit.json`: the settings (`config`), data report, wall time and token counts.

While running, finished examples are appended to `examples.partial.jsonl` and their embeddings saved in
`embeddings.partial/`; a rerun with the same settings skips every example already in `examples.jsonl` or
the partial files. The final files are written atomically and the partial ones removed.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .data.formats import Conversation, Message
from .data.pipeline import DataOptions, DataReport, iter_conversations
from .data.pipeline import record_progress
from .io import atomic_write
from .data.template import TemplateError, assistant_header, render_conversation, resolve_template
from .data.tokenize import IGNORE, Dropped, Example, TokenizeOptions, protected_pattern, tokenize_rendered
from .data.validate import DataError
from .evaluate.scoring import length_batches

AUDIT_VERSION = 1
GEN_MARGIN = 16  # greedy answers may run this many tokens past the reference length
VERDICTS = ("known", "latent", "unknown")


# ---- options ------------------------------------------------------------------------------------------------
@dataclass
class Thresholds:
    """Verdict thresholds (see docs/audit.md)."""

    known_match: float = 0.5  # greedy (or few-shot) exact-match rate at or above which the answer is produced
    known_nll: float = 0.5  # median s_cond (nats/token) at or below which the answer is already likely
    latent_ratio: float = 0.6  # median s_cond/s_uncond (with or without shots) at or below which it is latent

    def __post_init__(self):
        if not 0.0 <= self.known_match <= 1.0:
            raise ValueError(f"known_match must be in [0, 1], got {self.known_match}")
        if self.known_nll < 0:
            raise ValueError(f"known_nll must be >= 0, got {self.known_nll}")
        if self.latent_ratio <= 0:
            raise ValueError(f"latent_ratio must be > 0, got {self.latent_ratio}")

    def describe(self) -> str:
        return (f"known: greedy exact match >= {self.known_match:.2f} or median s_cond <= {self.known_nll:.2f} "
                f"nats/token; latent: median IFD or few-shot ratio <= {self.latent_ratio:.2f}, or few-shot exact "
                f"match >= {self.known_match:.2f}; unknown: otherwise")


@dataclass
class AuditOptions:
    model: str = "default"
    dtype: str = "fp32"  # fp32 (exact) or bf16 autocast; NLLs are always computed from fp32 logits
    few_shot: int = 0  # K demonstrations of the same task for the few-shot baseline (0: off)
    few_shot_per_task: int = 50  # the few-shot baseline is measured on this many examples per task
    generate: bool = False
    max_new_tokens: int = 64
    limit_per_task: int | None = None  # a seeded uniform sample of this many examples per task
    seed: int = 0
    batch_tokens: int = 8192  # padded tokens per forward batch
    max_batch_size: int = 64
    chunk_examples: int = 128  # examples finished (and saved) together
    overwrite: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        for name in ("few_shot", "few_shot_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "batch_tokens", "max_batch_size", "chunk_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit_per_task is not None and self.limit_per_task < 1:
            raise ValueError(f"limit_per_task must be >= 1, got {self.limit_per_task}")


def audit_data_options(data: DataOptions) -> DataOptions:
    """The data options the audit scores with: only the last assistant turn, prompt tokens unweighted."""
    tok = data.tokenize
    return DataOptions(format=data.format, task_field=data.task_field, task_map=data.task_map, strip=data.strip,
                       template=data.template, skip_invalid=data.skip_invalid, dedup=data.dedup,
                       tokenize=TokenizeOptions(max_length=tok.max_length, truncation=tok.truncation,
                                                loss_on="last_assistant", prompt_loss_weight=0.0))


# ---- items: the examples to audit ------------------------------------------------------------------------------
@dataclass
class Item:
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


def message_dicts(conv: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content, **({"train": m.train} if m.train is not None else {})}
            for m in conv.messages]


def conversation_key(conv: Conversation) -> str:
    blob = json.dumps([conv.task, message_dicts(conv)], ensure_ascii=False, sort_keys=True)
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


def collect_items(inputs: list, tokenizer, data: DataOptions, limit_per_task: int | None = None, seed: int = 0,
                  report: DataReport | None = None, on_record: Callable[[], None] | None = None) -> list[Item]:
    """Read, normalise, (sample,) render and tokenize: the examples to audit, in input order."""
    data = audit_data_options(data)
    report = report if report is not None else DataReport()
    tmpl = resolve_template(data.template, tokenizer)
    protected = protected_pattern(tokenizer)
    convs = sample_per_task(iter_conversations(inputs, data, report, protected.findall, on_record),
                            limit_per_task, seed)
    items: list[Item] = []

    def handle(err: DataError):
        if not data.skip_invalid:
            raise err
        report.invalid.add(err)

    for start in range(0, len(convs), 256):
        batch_c, batch_r = [], []
        for conv in convs[start:start + 256]:
            try:
                batch_r.append(render_conversation(conv, tmpl))
                batch_c.append(conv)
            except TemplateError as e:
                handle(DataError(conv.where, "template", str(e)))
        for conv, res in zip(batch_c, tokenize_rendered(batch_r, batch_c, tokenizer, data.tokenize, protected)):
            if isinstance(res, DataError):
                handle(res)
            elif isinstance(res, Dropped):
                report.dropped[res.reason] += 1
            else:
                report.kept += 1
                report.truncated += res.truncated
                items.append(Item(len(items), str(conv.where), conv.task, conv, res, conversation_key(conv)))
    if limit_per_task is not None:  # the report's per-task counts describe what is audited
        report.tasks = Counter(it.task for it in items)
    return items


def shot_conversation(target: Conversation, shots: list[Conversation]) -> Conversation:
    """`target` preceded by the shots' user/assistant turns (after the target's own system prompt)."""
    msgs = target.messages
    head = [m for m in msgs[:1] if m.role == "system"]
    demo = [Message(m.role, m.content, False if m.role == "assistant" else m.train)
            for s in shots for m in s.messages if m.role != "system"]
    return Conversation(head + demo + msgs[len(head):], target.task, target.where)


def plan_shots(items: list[Item], k: int, per_task: int, seed: int) -> dict[int, list[int]]:
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


# ---- scoring ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One sequence to score: the mean NLL of ids[start:start+n] (and, if `pool`, its mean hidden state)."""

    index: int
    kind: str  # cond | uncond | shot
    ids: list[int]
    start: int
    n: int
    pool: bool = False


def make_batches(jobs: list[Job], batch_tokens: int, max_batch: int) -> list[list[Job]]:
    """Length-sorted batches whose size x longest sequence stays within `batch_tokens` (ties in index order)."""
    jobs = sorted(jobs, key=lambda j: j.index)
    return [[jobs[i] for i in b] for b in length_batches([len(j.ids) for j in jobs], batch_tokens, max_batch)]


def split_model(model):
    """(body, head): the transformer returning hidden states, and the output projection."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    return body, head


class Scorer:
    """Mean response NLLs and pooled hidden states for batches of jobs, without gradients.

    Only the response positions go through the output projection (the full-vocabulary logits of prompt
    tokens are never needed); `check` verifies once that this equals the model's own logits, and falls
    back to the full forward for models whose logits are more than a linear head (soft-capping, scaling).
    """

    def __init__(self, model, pad_id: int, dtype: str = "fp32"):
        import torch

        self.model = model.eval()
        self.pad_id = pad_id
        self.autocast = dtype == "bf16"
        self.device = next(model.parameters()).device
        self.body, self.head = split_model(model)
        self.torch = torch

    def _ctx(self):
        import contextlib

        if self.autocast:
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _pad(self, seqs: list[list[int]]):
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _hidden(self, ids, mask):
        if self.body is not None and self.head is not None:
            return self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def check(self, job: Job, tol: float = 1e-3) -> bool:
        """Whether body + head on the response positions reproduces the model's logits (fp32)."""
        torch = self.torch
        if self.body is None or self.head is None:
            return False
        ids, mask = self._pad([job.ids[:job.start + min(job.n, 8)]])
        with torch.inference_mode():
            full = self.model(input_ids=ids, attention_mask=mask).logits.float()
            mine = self.head(self.body(input_ids=ids, attention_mask=mask).last_hidden_state).float()
        ok = torch.allclose(full, mine, atol=tol, rtol=tol)
        if not ok:
            self.body = None
        return ok

    def score(self, batch: list[Job]) -> tuple[list[float], dict[int, np.ndarray]]:
        """(mean NLL per job, {index: pooled hidden state} for the jobs that ask for it)."""
        torch = self.torch
        import torch.nn.functional as F

        ids, mask = self._pad([j.ids for j in batch])
        rows = torch.cat([torch.full((j.n,), r, dtype=torch.long) for r, j in enumerate(batch)]).to(self.device)
        cols = torch.cat([torch.arange(j.start - 1, j.start - 1 + j.n) for j in batch]).to(self.device)
        with torch.inference_mode():
            with self._ctx():  # bf16 autocast covers the projection too; the cross-entropy is fp32
                if self.body is not None:
                    hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
                    logits = self.head(hidden[rows, cols])  # the response positions only
                else:
                    out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    hidden, logits = out.hidden_states[-1], out.logits[rows, cols]
            nll = F.cross_entropy(logits.float(), ids[rows, cols + 1], reduction="none").double()
            sums = torch.zeros(len(batch), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
            means = (sums / torch.tensor([j.n for j in batch], dtype=torch.float64, device=nll.device)).tolist()
            pooled = {}
            want = [r for r, j in enumerate(batch) if j.pool]
            if want:
                m = mask[want].unsqueeze(-1).float()
                vec = (hidden[want].float() * m).sum(1) / m.sum(1)
                pooled = {batch[r].index: v for r, v in zip(want, vec.cpu().numpy().astype(np.float32))}
        return means, pooled

    def forward_only(self, batch: list[Job]) -> None:
        """The reference cost: a plain batched no-grad forward over the same padded batch (benchmarks)."""
        ids, mask = self._pad([j.ids for j in batch])
        with self.torch.inference_mode(), self._ctx():
            self.model(input_ids=ids, attention_mask=mask)


def greedy_answers(scorer: Scorer, tokenizer, tmpl, prompts: list[list[int]], caps: list[int],
                   batch_tokens: int, max_batch: int) -> list[str]:
    """Greedy replies to token-id prompts; reply i is cut to caps[i] new tokens and at end-of-turn."""
    from .generate import Decoding, left_pad, decode_reply, generation_config, stop_markers

    torch = scorer.torch
    stops = stop_markers(tmpl, tokenizer)
    out = [""] * len(prompts)
    # grouped by answer budget, then prompt length: a batch generates only as long as its longest budget
    order = sorted(range(len(prompts)), key=lambda i: (caps[i], len(prompts[i]), i))
    batches, cur = [], []
    for i in order:
        if cur and ((len(cur) + 1) * (len(prompts[i]) + max(caps[j] for j in cur + [i])) > batch_tokens
                    or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    for batch in batches:
        cap = max(caps[i] for i in batch)
        cfg = generation_config(Decoding(max_new_tokens=cap), tmpl, tokenizer)
        ids, mask = left_pad([prompts[i] for i in batch], cfg.pad_token_id)
        with torch.inference_mode(), scorer._ctx():
            gen = scorer.model.generate(input_ids=ids.to(scorer.device), attention_mask=mask.to(scorer.device),
                                        generation_config=cfg, tokenizer=tokenizer if cfg.stop_strings else None)
        for r, i in enumerate(batch):
            out[i] = decode_reply(gen[r, ids.shape[1]:ids.shape[1] + caps[i]].tolist(), tokenizer, stops)
    return out


# ---- one chunk of examples: every job, then the rows --------------------------------------------------------------
@dataclass
class Chunk:
    items: list[Item]
    jobs: list[Job]
    shot_items: dict[int, Example]  # index -> few-shot example (prompt with shots, same response)
    n_shots: dict[int, int]

    @property
    def tokens(self) -> int:
        return sum(len(j.ids) for j in self.jobs)


def build_chunks(pending: list[Item], all_items: list[Item], tokenizer, tmpl, data: DataOptions,
                 opts: AuditOptions) -> list[Chunk]:
    """Pending items sorted by length and cut into chunks; each chunk's cond/uncond/shot jobs."""
    from .evaluate.scoring import tokenize_conversations

    header_ids = tokenizer(assistant_header(tmpl), add_special_tokens=False).input_ids
    shot_plan = plan_shots(all_items, opts.few_shot, opts.few_shot_per_task, opts.seed)
    pending = sorted(pending, key=lambda it: (len(it.example.input_ids), it.index))
    tok_opts = audit_data_options(data).tokenize
    chunks = []
    for start in range(0, len(pending), opts.chunk_examples):
        part = pending[start:start + opts.chunk_examples]
        jobs, shot_examples, n_shots = [], {}, {}
        for it in part:
            a, b = it.response
            ids = it.example.input_ids
            jobs.append(Job(it.index, "cond", ids, a, b - a, pool=True))
            jobs.append(Job(it.index, "uncond", header_ids + ids[a:b], len(header_ids), b - a))
        targets = [it for it in part if it.index in shot_plan]
        convs = [shot_conversation(it.conv, [all_items[j].conv for j in shot_plan[it.index]]) for it in targets]
        for it, res in zip(targets, tokenize_conversations(convs, tokenizer, tmpl, tok_opts) if convs else []):
            if isinstance(res, Example):
                pos = [i for i, lab in enumerate(res.labels) if lab != IGNORE]
                jobs.append(Job(it.index, "shot", res.input_ids, pos[0], len(pos)))
                shot_examples[it.index] = res
                n_shots[it.index] = len(shot_plan[it.index])
        chunks.append(Chunk(part, jobs, shot_examples, n_shots))
    return chunks


def _ratio(a, b):
    return a / b if a is not None and b else None


def run_chunk(chunk: Chunk, scorer: Scorer, tokenizer, tmpl, opts: AuditOptions,
              on_tokens: Callable[[int], None] | None = None) -> tuple[list[dict], dict[int, np.ndarray]]:
    from .evaluate.metrics import exact_match, rouge_l

    values: dict = defaultdict(dict)
    pooled: dict[int, np.ndarray] = {}
    for batch in make_batches(chunk.jobs, opts.batch_tokens, opts.max_batch_size):
        means, emb = scorer.score(batch)
        pooled.update(emb)
        for job, v in zip(batch, means):
            values[job.index][job.kind] = v
        if on_tokens:
            on_tokens(sum(len(j.ids) for j in batch))
    gens: dict = {}
    if opts.generate:
        prompts, caps, keys = [], [], []
        for it in chunk.items:
            a, b = it.response
            prompts.append(it.example.input_ids[:a])
            caps.append(min(opts.max_new_tokens, b - a + GEN_MARGIN))
            keys.append((it.index, "generation"))
            if it.index in chunk.shot_items:
                ex = chunk.shot_items[it.index]
                sa = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
                prompts.append(ex.input_ids[:sa])
                caps.append(min(opts.max_new_tokens, b - a + GEN_MARGIN))
                keys.append((it.index, "generation_shot"))
        answers = greedy_answers(scorer, tokenizer, tmpl, prompts, caps, opts.batch_tokens, opts.max_batch_size)
        for key, ans in zip(keys, answers):
            gens[key] = ans
    rows = []
    for it in chunk.items:
        v = values[it.index]
        a, b = it.response
        row = {"index": it.index, "source": it.source, "task": it.task, "key": it.key,
               "messages": message_dicts(it.conv), "n_tokens": len(it.example.input_ids),
               "n_response_tokens": b - a, "truncated": it.example.truncated,
               "s_cond": v["cond"], "s_uncond": v["uncond"], "ifd": _ratio(v["cond"], v["uncond"])}
        if opts.few_shot:
            row.update(n_shots=chunk.n_shots.get(it.index, 0), s_cond_shot=v.get("shot"),
                       shot_ratio=_ratio(v.get("shot"), v["uncond"]))
        if opts.generate:
            g = gens[(it.index, "generation")]
            row.update(generation=g, exact_match=float(exact_match(g, it.reference)),
                       rouge_l=float(rouge_l(g, it.reference)))
            if opts.few_shot:
                gs = gens.get((it.index, "generation_shot"))
                row.update(generation_shot=gs,
                           exact_match_shot=None if gs is None else float(exact_match(gs, it.reference)))
        rows.append(row)
    return rows, pooled


# ---- verdicts and per-task statistics ------------------------------------------------------------------------------
def _vals(rows, key) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


def quantiles(values) -> dict | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {"mean": float(a.mean()), **{f"p{p}": float(x) for p, x in zip((10, 25, 50, 75, 90), q)}}


def verdict(s_cond: float | None, ifd: float | None, th: Thresholds, exact: float | None = None,
            shot_ratio: float | None = None, exact_shot: float | None = None) -> tuple[str, str]:
    """(verdict, reason) from one example's numbers or a task's aggregates (median NLLs/ratios, mean matches)."""
    if exact is not None and exact >= th.known_match:
        return "known", f"greedy EM {exact:.2f} >= {th.known_match:.2f}"
    if s_cond is not None and s_cond <= th.known_nll:
        return "known", f"s_cond {s_cond:.2f} <= {th.known_nll:.2f}"
    if ifd is not None and ifd <= th.latent_ratio:
        return "latent", f"IFD {ifd:.2f} <= {th.latent_ratio:.2f}"
    if shot_ratio is not None and shot_ratio <= th.latent_ratio:
        return "latent", f"few-shot ratio {shot_ratio:.2f} <= {th.latent_ratio:.2f}"
    if exact_shot is not None and exact_shot >= th.known_match:
        return "latent", f"few-shot EM {exact_shot:.2f} >= {th.known_match:.2f}"
    parts = [f"s_cond {s_cond:.2f} > {th.known_nll:.2f}" if s_cond is not None else None,
             f"IFD {ifd:.2f} > {th.latent_ratio:.2f}" if ifd is not None else None,
             f"few-shot ratio {shot_ratio:.2f} > {th.latent_ratio:.2f}" if shot_ratio is not None else None]
    return "unknown", ", ".join(p for p in parts if p) or "no measurements"


def example_verdict(row: dict, th: Thresholds) -> str:
    return verdict(row.get("s_cond"), row.get("ifd"), th, row.get("exact_match"), row.get("shot_ratio"),
                   row.get("exact_match_shot"))[0]


def task_stats(rows: list[dict], th: Thresholds) -> dict:
    """Aggregates and verdict for one group of example rows."""
    s_cond, ifd = _vals(rows, "s_cond"), _vals(rows, "ifd")
    stats = {
        "n": len(rows), "n_response_tokens": _mean(_vals(rows, "n_response_tokens")),
        "s_cond": quantiles(s_cond), "s_uncond": quantiles(_vals(rows, "s_uncond")), "ifd": quantiles(ifd),
        "share_ifd_gt_1": _mean([float(x > 1) for x in ifd]),
        "n_shot": len(_vals(rows, "s_cond_shot")), "s_cond_shot": _median(_vals(rows, "s_cond_shot")),
        "shot_ratio": _median(_vals(rows, "shot_ratio")),
        "exact_match": _mean(_vals(rows, "exact_match")), "rouge_l": _mean(_vals(rows, "rouge_l")),
        "exact_match_shot": _mean(_vals(rows, "exact_match_shot")),
        "verdicts": dict(Counter(example_verdict(r, th) for r in rows)),
    }
    stats["verdict"], stats["reason"] = verdict(_median(s_cond), _median(ifd), th, stats["exact_match"],
                                                stats["shot_ratio"], stats["exact_match_shot"])
    return stats


def summarize_tasks(rows: list[dict], th: Thresholds, few_shot: int = 0) -> dict:
    by_task: dict = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return {"thresholds": asdict(th), "thresholds_text": th.describe(), "few_shot": few_shot,
            "tasks": {str(t): task_stats(rs, th) for t, rs in sorted(by_task.items(), key=lambda kv: str(kv[0]))},
            "overall": task_stats(rows, th)}


# ---- the audit directory -----------------------------------------------------------------------------------------
def _config(inputs, opts: AuditOptions, data: DataOptions, model_path: str) -> dict:
    from .data.load import expand_paths

    d = audit_data_options(data)
    return {"version": AUDIT_VERSION, "data": [str(p.resolve()) for p in expand_paths(inputs)],
            "model": opts.model, "model_path": model_path, "dtype": opts.dtype, "template": d.template,
            "format": d.format, "task_field": d.task_field,
            "task_map": str(Path(d.task_map).resolve()) if d.task_map else None, "strip": list(d.strip),
            "skip_invalid": d.skip_invalid, "dedup": d.dedup, "max_length": d.tokenize.max_length,
            "truncation": d.tokenize.truncation, "few_shot": opts.few_shot,
            "few_shot_per_task": opts.few_shot_per_task, "generate": opts.generate,
            "max_new_tokens": opts.max_new_tokens, "limit_per_task": opts.limit_per_task, "seed": opts.seed}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
    return rows


def load_previous(out_dir: Path, items: list[Item], config: dict, overwrite: bool) -> tuple[dict, dict]:
    """Rows and embeddings of examples a previous run with the same settings finished: ({index: row}, {index: vec})."""
    meta_path = out_dir / "audit.json"
    partial_rows, partial_emb = out_dir / "examples.partial.jsonl", out_dir / "embeddings.partial"
    old_rows = _read_jsonl(out_dir / "examples.jsonl") + _read_jsonl(partial_rows)
    if overwrite or not old_rows:
        for p in (out_dir / "examples.jsonl", partial_rows, out_dir / "embeddings.npy", out_dir / "tasks.json"):
            p.unlink(missing_ok=True)
        shutil.rmtree(partial_emb, ignore_errors=True)
        return {}, {}
    old = json.loads(meta_path.read_text()).get("config") if meta_path.is_file() else None
    if old != config:
        diff = sorted(k for k in set(config) | set(old or {}) if (old or {}).get(k) != config.get(k))
        raise ValueError(f"{out_dir} holds an audit made with different settings ({', '.join(diff)}); "
                         "use another --out or pass --overwrite")
    keys = {it.index: it.key for it in items}
    rows = {r["index"]: r for r in old_rows if keys.get(r.get("index")) == r.get("key")}
    emb: dict = {}
    npy = out_dir / "embeddings.npy"
    if npy.is_file():
        arr = np.load(npy)
        emb.update({i: arr[i] for i in rows if i < len(arr)})
    if partial_emb.is_dir():
        for f in sorted(partial_emb.glob("*.npz")):
            with np.load(f) as z:
                emb.update({int(i): v for i, v in zip(z["index"], z["emb"])})
    done = {i: r for i, r in rows.items() if i in emb}
    return done, {i: emb[i] for i in done}


def print_task_table(summary: dict, console: Console) -> None:
    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    few = summary["few_shot"]
    t = Table(title="sftlab audit: what the base model already knows, per task")
    for col in ("task", "n", "resp tok", "s_cond p50", "s_uncond p50", "IFD p50", "IFD>1"):
        t.add_column(col, justify="left" if col == "task" else "right")
    if few:
        t.add_column(f"{few}-shot ratio", justify="right")
    has_gen = summary["overall"]["exact_match"] is not None
    if has_gen:
        t.add_column("EM", justify="right")
        t.add_column("ROUGE-L", justify="right")
        if few:
            t.add_column(f"{few}-shot EM", justify="right")
    t.add_column("verdict")
    t.add_column("reason", overflow="fold")
    style = {"known": "green", "latent": "yellow", "unknown": "red"}
    entries = list(summary["tasks"].items())
    if len(entries) > 1:
        entries.append(("ALL", summary["overall"]))
    for name, s in entries:
        if name == "ALL":
            t.add_section()
        cells = [name, str(s["n"]), f(s["n_response_tokens"], 0), f((s["s_cond"] or {}).get("p50")),
                 f((s["s_uncond"] or {}).get("p50")), f((s["ifd"] or {}).get("p50")),
                 "-" if s["share_ifd_gt_1"] is None else f"{s['share_ifd_gt_1']:.0%}"]
        if few:
            cells.append(f(s["shot_ratio"]))
        if has_gen:
            cells += [f(s["exact_match"]), f(s["rouge_l"])]
            if few:
                cells.append(f(s["exact_match_shot"]))
        cells += [f"[{style[s['verdict']]}]{s['verdict']}[/]", s["reason"]]
        t.add_row(*cells)
    console.print(t)
    console.print(f"[dim]verdict thresholds: {summary['thresholds_text']}[/]", highlight=False)


def run_audit(inputs: list, out_dir: str | Path, opts: AuditOptions, data: DataOptions,
              console: Console | None = None, model=None, tokenizer=None, table: Console | None = None) -> dict:
    """Audit `inputs` with `opts.model` into `out_dir`; returns the tasks summary (also in tasks.json).

    Progress and the summary line go to `console` (stderr), the per-task table to `table` (stdout).
    `model`/`tokenizer` may be passed already loaded (tests, benchmarks); `opts.model` is then only a label.
    """
    from .models import load_model, load_tokenizer, resolve_model

    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(opts.model)
    model_path = "(in memory)" if model is not None else str(resolve_model(opts.model).resolve())
    tmpl = resolve_template(data.template, tokenizer)
    report = DataReport()
    with record_progress(inputs, console, "read") as tick:
        items = collect_items(inputs, tokenizer, data, opts.limit_per_task, opts.seed, report, tick)
    if not items:
        raise ValueError("no example to audit: every record was invalid or dropped")
    config = _config(inputs, opts, data, model_path)
    done, embs = load_previous(out_dir, items, config, opts.overwrite)
    meta = {"config": config, "status": "running", "data_report": report.as_dict()}
    with atomic_write(out_dir / "audit.json") as f:
        json.dump(meta, f, indent=2)
    pending = [it for it in items if it.index not in done]
    scored_tokens, t_score = 0, 0.0
    if pending:
        if model is None:
            model = load_model(opts.model)
        chunks = build_chunks(pending, items, tokenizer, tmpl, data, opts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scorer = Scorer(model, pad, opts.dtype)
        meta["response_positions_only"] = scorer.check(chunks[0].jobs[0])
        total = sum(c.tokens for c in chunks)
        partial_emb = out_dir / "embeddings.partial"
        partial_emb.mkdir(exist_ok=True)
        columns = (TextColumn("[bold]audit"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TextColumn("{task.fields[examples]} examples"), TimeElapsedColumn(), TimeRemainingColumn())
        t0 = time.perf_counter()
        with Progress(*columns, console=console) as progress, \
                open(out_dir / "examples.partial.jsonl", "a", encoding="utf-8") as fp:
            bar = progress.add_task("audit", total=total, examples=f"{len(done)}/{len(items)}")
            finished = len(done)
            for k, chunk in enumerate(chunks):
                rows, pooled = run_chunk(chunk, scorer, tokenizer, tmpl, opts,
                                         lambda n: progress.advance(bar, n))
                idx = np.array([r["index"] for r in rows], dtype=np.int64)
                vecs = np.stack([pooled[i] for i in idx.tolist()])
                with atomic_write(partial_emb / f"chunk-{idx.min():08d}-{k:05d}.npz", "wb") as fe:
                    np.savez(fe, index=idx, emb=vecs)
                for r in rows:
                    fp.write(json.dumps(r, ensure_ascii=False) + "\n")
                fp.flush()
                done.update({r["index"]: r for r in rows})
                embs.update({int(i): v for i, v in zip(idx, vecs)})
                finished += len(rows)
                progress.update(bar, examples=f"{finished}/{len(items)}")
        t_score = time.perf_counter() - t0
        scored_tokens = total
    rows = [done[it.index] for it in items]
    for r in rows:
        r["verdict"] = example_verdict(r, opts.thresholds)
    summary = summarize_tasks(rows, opts.thresholds, opts.few_shot)
    with atomic_write(out_dir / "examples.jsonl") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with atomic_write(out_dir / "embeddings.npy", "wb") as f:
        np.save(f, np.stack([embs[it.index] for it in items]).astype(np.float32))
    with atomic_write(out_dir / "tasks.json") as f:
        json.dump(summary, f, indent=2)
    wall = time.perf_counter() - t_start
    meta.update(status="complete", n_examples=len(items), resumed=len(items) - len(pending),
                scored=len(pending), tokens_scored=scored_tokens, scoring_s=round(t_score, 3),
                tokens_per_s=round(scored_tokens / t_score, 1) if t_score else None, wall_s=round(wall, 3),
                task_map_clusters=_clusters(data.task_map))
    with atomic_write(out_dir / "audit.json") as f:
        json.dump(meta, f, indent=2)
    (out_dir / "examples.partial.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "embeddings.partial", ignore_errors=True)
    print_task_table(summary, table or (Console(quiet=True) if console.quiet else Console()))
    counts = Counter(s["verdict"] for s in summary["tasks"].values())
    console.print(f"[green]done[/] audited {len(items):,} examples in {len(summary['tasks'])} tasks "
                  f"({len(items) - len(pending):,} resumed, {scored_tokens:,} tokens scored in {wall:.0f} s"
                  + (f", {scored_tokens / t_score:,.0f} tokens/s" if t_score else "") + "); tasks: "
                  + ", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" -> {out_dir}", highlight=False)
    return summary


def _clusters(task_map: str | None) -> dict | None:
    """task -> cluster from a task map whose entries carry one (recorded for reports)."""
    if not task_map:
        return None
    raw = json.loads(Path(task_map).read_text(encoding="utf-8"))
    out = {v["task"]: v["cluster"] for v in raw.values() if isinstance(v, dict) and "cluster" in v and "task" in v}
    return out or None


__all__ = ["AuditOptions", "Thresholds", "run_audit", "collect_items", "summarize_tasks", "task_stats", "verdict",
           "example_verdict", "Scorer", "make_batches", "build_chunks", "run_chunk"]
