"""The SFT recipe, top to bottom: setup -> train (batches, forward, loss, backward, step, eval, checkpoint) -> save.

Loss normalisation: the loss of an optimizer step is the sum of per-token NLL over *all* trained tokens
of the global batch (every micro-batch of every process) divided by their count (or weight sum). Each
process knows the whole step's token count in advance (the batch plan is deterministic), so every
micro-batch backpropagates `its NLL sum / global count * world_size` (DDP averages gradients over
processes); nothing is a mean of per-micro-batch means.

Exact resume: the micro-batch stream is a pure function of (seed, epoch), so the data position is just
the step number; parameters, optimizer, scheduler and RNG states come from the checkpoint.

Forgetting mitigations (docs/training.md, "Mitigations"), each off by default: `train.replay` mixes general
examples into the micro-batches (drawn as a pure function of seed, epoch and micro-batch, so resume stays
exact; their tokens count in the normaliser like any other), `train.kl_to_base` adds λ·KL(p_tuned || p_base)
per trained token inside the same chunked loss, `train.l2_to_base` adds the exact gradient of λ·||θ-θ0||²
once per optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import RunConfig, dump_config
from ..data.packing import collate_packed, collate_padded, largest_first, length_grouped_batches, pack_best_fit
from ..data.pipeline import DataOptions, DataReport, iter_examples
from ..data.template import ChatTemplate, end_of_turn_ids, resolve_template
from ..data.tokenize import Example, TokenizeOptions
from ..models import load_model, load_tokenizer, resolve_model
from .checkpoint import list_checkpoints, load_checkpoint, remove_partial, save_checkpoint
from .loss import sft_kl_loss_sum, sft_loss_sum
from .precision import MasterWeights, cast_model
from .runtime import init_adamw_state, release_memory, tune_malloc


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    weight_change: dict = field(default_factory=dict)
    model_dir: Path | None = None


# ---------------------------------------------------------------------------------------------- setup
def data_options(cfg: RunConfig) -> DataOptions:
    d = cfg.data
    return DataOptions(format=d.format, task_field=d.task_field, task_map=d.task_map, strip=tuple(d.strip),
                       template=d.template, skip_invalid=d.skip_invalid, dedup=d.dedup,
                       tokenize=TokenizeOptions(max_length=d.max_length, truncation=d.truncation,
                                                loss_on=d.loss_on, prompt_loss_weight=d.prompt_loss_weight))


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[list[Example], list[Example], DataReport]:
    if not cfg.data.train:
        raise ValueError("data.train is empty: give training data files (data.train=[path, ...])")
    opts = data_options(cfg)
    report = DataReport()
    train = list(iter_examples(cfg.data.train, tokenizer, opts, report))
    if not train:
        raise ValueError("no training examples left after validation and truncation")
    if cfg.data.eval:
        evals = list(iter_examples(cfg.data.eval, tokenizer, opts))
    elif cfg.data.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(len(train) * cfg.data.eval_fraction))
        held = set(order[:n_eval])
        evals = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        evals = []
    return train, evals, report


def prepare_replay(cfg: RunConfig, tokenizer) -> tuple[list[Example], DataReport | None]:
    """The replay pool: train.replay.data through the same data layer and options, every example labelled
    train.replay.task (its own format detection; no task field or map)."""
    r = cfg.train.replay
    if r is None:
        return [], None
    opts = dataclasses.replace(data_options(cfg), format=r.format, task_field=None, task_map=None)
    report = DataReport()
    try:
        pool = [dataclasses.replace(ex, task=r.task) for ex in iter_examples(r.data, tokenizer, opts, report)]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.replay.data: {e}") from None
    if not pool:
        raise ValueError(f"train.replay.data: no replay examples left after validation and truncation ({r.data})")
    if r.limit is not None and r.limit < len(pool):
        keep = sorted(random.Random(f"replay-limit:{cfg.train.seed}").sample(range(len(pool)), r.limit))
        pool = [pool[i] for i in keep]
    return pool, report


def apply_lora(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                          use_dora=lc.use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def replay_count(n: int, ratio: float) -> int:
    """Replay examples to add to n task examples so that they make up `ratio` of the whole (>= 1 if ratio > 0)."""
    return max(1, round(n * ratio / (1 - ratio))) if ratio > 0 else 0


def replay_draw(pool: int, k: int, seed: int, epoch: int, index: int) -> list[int]:
    """k indices into the replay pool, a pure function of (seed, epoch, micro-batch index): successive seeded
    permutations of the pool, so nothing repeats within a draw unless k > pool."""
    rng = random.Random(f"replay:{seed}:{epoch}:{index}")  # str seeds hash with sha512: same in every process
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(pool), min(pool, k - len(out)))
    return out


def epoch_batches(examples: list[Example], cfg: RunConfig, epoch: int,
                  replay: list[Example] | None = None) -> list[list[int]]:
    """Micro-batches (lists of example indices) of one epoch, deterministic in (seed, epoch).

    With a replay pool, index len(examples) + j is replay[j]. length_grouped: every micro-batch of n task
    examples gets `replay_count(n, ratio)` replay examples drawn for (seed, epoch, micro-batch); packed: a
    sample of `replay_count(len(examples), ratio)` replay examples drawn for (seed, epoch) is packed with them.
    """
    t = cfg.train
    lengths = [len(ex.input_ids) for ex in examples]
    n, ratio = len(examples), (t.replay.ratio if t.replay is not None and replay else 0.0)
    if t.batching == "packed":
        pool = list(range(n)) + [n + j for j in replay_draw(len(replay or ()), replay_count(n, ratio),
                                                                t.seed, epoch, -1)]
        length = {j: lengths[j] if j < n else len(replay[j - n].input_ids) for j in pool}
        rows = pack_best_fit([length[j] for j in pool], t.batch_tokens or cfg.data.max_length)
        rows = [[pool[i] for i in row] for row in rows]
        random.Random(t.seed * 1_000_003 + epoch).shuffle(rows)
        return largest_first(rows, [sum(length[j] for j in row) for row in rows])
    batches = length_grouped_batches(lengths, batch_tokens=None if t.batch_size else t.batch_tokens,
                                      batch_size=t.batch_size, shuffle=True, seed=t.seed * 1_000_003 + epoch)
    if ratio > 0:
        batches = [b + [n + j for j in replay_draw(len(replay), replay_count(len(b), ratio), t.seed, epoch, i)]
                   for i, b in enumerate(batches)]
    return batches


class MicroBatchStream:
    """The global stream of micro-batches, epoch after epoch; optimizer step k owns items [k*n, (k+1)*n).

    Epochs have the same number of micro-batches, except packed batching with replay, where each epoch packs
    its own replay sample; the stream then keeps the length of every epoch it has planned.
    """

    def __init__(self, examples, cfg: RunConfig, per_step: int, world: int = 1, replay: list[Example] | None = None):
        self.examples, self.cfg, self.per_step, self.replay = examples, cfg, per_step, replay or None
        self._cache: dict[int, list[list[int]]] = {}
        self._lengths: list[int] = []  # micro-batches of epochs 0, 1, ...
        self.fixed = not (self.replay and cfg.train.batching == "packed")
        self.per_epoch = self._epoch_len(0)
        e = int(cfg.train.epochs)
        if self.fixed:
            self.total = max(1, int(round(cfg.train.epochs * self.per_epoch)))
        else:
            self.total = max(1, sum(self._epoch_len(k) for k in range(e))
                             + int(round((cfg.train.epochs - e) * self._epoch_len(e))))
        if cfg.train.max_steps:
            self.steps = cfg.train.max_steps
        else:
            n = math.ceil(self.total / per_step)
            # every process needs at least one micro-batch in a step (DDP syncs once per step)
            self.steps = n - 1 if n > 1 and self.total - (n - 1) * per_step < world else n

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            extra = (self.replay,) if self.replay else ()
            self._cache = {epoch: epoch_batches(self.examples, self.cfg, epoch, *extra)}
        return self._cache[epoch]

    def _epoch_len(self, epoch: int) -> int:
        if self.fixed and self._lengths:
            return self._lengths[0]
        while len(self._lengths) <= epoch:
            self._lengths.append(len(self._epoch(len(self._lengths))))
        return self._lengths[epoch]

    def _batch(self, i: int) -> list[int]:
        epoch = 0
        while i >= self._epoch_len(epoch):
            i -= self._epoch_len(epoch)
            epoch += 1
        return self._epoch(epoch)[i]

    def step(self, k: int) -> list[list[int]]:
        lo, hi = k * self.per_step, (k + 1) * self.per_step
        if not self.cfg.train.max_steps:
            hi = min(hi, self.total)
        return [self._batch(i) for i in range(lo, hi)]


def collate(examples: list[Example], cfg: RunConfig, pad_id: int) -> dict:
    batch = collate_packed(examples) if cfg.train.batching == "packed" else collate_padded(examples, pad_id)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def trained_weight(examples: list[Example]) -> float:
    """Loss normaliser contribution: trained tokens (or their weights) that are actual targets."""
    total = 0.0
    for ex in examples:
        if ex.weights is None:
            total += sum(1 for x in ex.labels[1:] if x != -100)
        else:
            total += sum(w for w, x in zip(ex.weights[1:], ex.labels[1:]) if x != -100)
    return total


class SFTLossModule(torch.nn.Module):
    """Model + chunked trained-token loss in one forward, so DDP/FSDP wrap a single module.

    Returns `(NLL sum, weight sum, KL sum or None)`. With `kl`, the base model's forward runs in here too
    (no gradient): `base_model` is a frozen copy (full fine-tuning), or None for a peft model whose adapter is
    disabled for that forward.
    """

    def __init__(self, model, chunk_size: int, kl: bool = False, base_model=None):
        super().__init__()
        self.model, self.chunk_size, self.kl, self.base_model = model, chunk_size, kl, base_model

    def forward(self, batch: dict, kl: bool = True):
        if self.kl and kl:
            return sft_kl_loss_sum(self.model, batch, self.base_model, chunk_size=self.chunk_size)
        return (*sft_loss_sum(self.model, batch, chunk_size=self.chunk_size), None)


def frozen_copy(model):
    """The model before training, as the KL reference for full fine-tuning: same dtype, eval mode, no grad."""
    base = copy.deepcopy(model).eval()
    base.requires_grad_(False)
    return base


def l2_anchor(module: SFTLossModule, master: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """θ0 of L2-SP on the parameters' own device and dtype: the trainable weights before training (the frozen
    base copy's tensors when there is one and they are exact; for LoRA the adapter's initialisation). With
    fp32 master weights, θ0 is the masters' initial values."""
    if master:
        return {n: p.detach().clone() for n, p in master.named().items()}
    base = dict(module.base_model.named_parameters()) if module.base_model is not None else {}
    return {n: base[n].detach() if n in base and base[n].shape == p.shape else p.detach().clone()
            for n, p in module.model.named_parameters() if p.requires_grad}


def add_l2_grad(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float) -> float:
    """Add the exact gradient 2λ(θ-θ0) of λ·||θ-θ0||² to every anchored parameter's .grad; return the penalty."""
    sq = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for n, p in params.items():
            if n not in anchor:
                continue
            d = p - anchor[n]
            sq += d.double().pow(2).sum().cpu()
            g = d.mul(2 * lam)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    return lam * float(sq)


def module_group(name: str) -> str:
    n = name.lower()
    for key, group in (("embed", "embeddings"), ("wte", "embeddings"), ("lm_head", "lm_head"),
                       ("attn", "attention"), ("mlp", "mlp"), ("norm", "norms")):
        if key in n:
            return group
    return "other"


def base_weights(model_path: str) -> dict[str, torch.Tensor]:
    """The base model's weights as loaded for training (θ0), read again from disk after training."""
    return {n: p.detach() for n, p in load_model(model_path, "fp32").named_parameters()}


def weight_change(model, base_path: str, lora: bool) -> dict:
    """Relative change ||θ-θ0|| / ||θ0|| overall and per module group (LoRA: ΔW of each adapted layer).

    θ0 (full fine-tuning) is read from `base_path` after training, so it costs no memory while training."""
    sq_d, sq_0 = {}, {}
    if lora:
        for name, mod in model.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
                d = mod.get_delta_weight("default").detach().float()
                w = mod.base_layer.weight.detach().float()
                g = module_group(name)
                sq_d[g] = sq_d.get(g, 0.0) + float(d.pow(2).sum())
                sq_0[g] = sq_0.get(g, 0.0) + float(w.pow(2).sum())
    else:
        theta0 = base_weights(base_path)
        for n, p in model.named_parameters():
            if p.requires_grad and n in theta0 and theta0[n].shape == p.shape:
                g = module_group(n)
                w0 = theta0[n].float().cpu()
                sq_d[g] = sq_d.get(g, 0.0) + float((p.detach().float().cpu() - w0).pow(2).sum())
                sq_0[g] = sq_0.get(g, 0.0) + float(w0.pow(2).sum())
    out = {g: math.sqrt(sq_d[g]) / math.sqrt(sq_0[g]) if sq_0[g] else 0.0 for g in sq_d}
    total0 = sum(sq_0.values())
    out["overall"] = math.sqrt(sum(sq_d.values())) / math.sqrt(total0) if total0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, console: Console | None = None, resume: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    console = console or Console(stderr=True)
    t = cfg.train
    # several processes on a machine without GPUs (torchrun / accelerate launch): gloo on CPU
    cpu_procs = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one process: a second train() call may use another precision (accelerate keeps the first otherwise)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    if t.malloc_tuning:
        tune_malloc()
    accelerator = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no", cpu=cpu_procs)
    if t.precision == "bf16-master" and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"train.precision=bf16-master works in one process or under DDP; with "
                         f"{accelerator.distributed_type.name} use precision: bf16 (its own mixed precision)")
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out = Path(cfg.output_dir)
    set_seed(t.seed)

    # data
    tokenizer = load_tokenizer(cfg.model.path)
    tmpl = resolve_template(cfg.data.template, tokenizer)
    train_ex, eval_ex, report = prepare_data(cfg, tokenizer)
    replay_ex, replay_report = prepare_replay(cfg, tokenizer)
    pool = train_ex + replay_ex  # micro-batch index len(train_ex) + j is replay example j
    per_step = t.grad_accum * world
    stream = MicroBatchStream(train_ex, cfg, per_step, world, replay_ex)
    total_steps = stream.steps

    # model + optimizer
    # auto: on CPU causal attention per example (sftlab/attention.py: no mask, Σnᵢ² for packed rows instead of
    # the dense row², a bmm kernel for short blocks; docs/benchmarks.md); elsewhere transformers' sdpa
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "segments" if accelerator.device.type == "cpu" else "sdpa"
    model = load_model(cfg.model.path, cfg.model.dtype, attn, cfg.model.trust_remote_code)
    model.config.use_cache = False
    # KL reference: LoRA switches its adapter off (no copy); full fine-tuning keeps the weights before training
    base_copy = frozen_copy(model) if t.kl_to_base and not cfg.lora.enabled else None
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    master = None
    if t.precision == "bf16-master":  # fp32 masters from the weights as loaded, then the model goes bf16
        master = MasterWeights(model)
        cast_model(model, torch.bfloat16)
        if base_copy is not None:
            cast_model(base_copy, torch.bfloat16)
    # the optimizer's parameters: the fp32 masters, or the model's own
    params = master.params if master else [p for p in model.parameters() if p.requires_grad]
    # fused AdamW (one kernel over all parameters) exists for CPU and CUDA tensors in torch >= 2.4
    fused = t.fused_adamw if t.fused_adamw is not None else all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused)
    warmup = int(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, t.scheduler))
    module = SFTLossModule(model, t.loss_chunk_size, kl=t.kl_to_base > 0, base_model=base_copy)
    if t.compile:
        module = torch.compile(module)
    module, optimizer = accelerator.prepare(module, optimizer)
    anchor = l2_anchor(accelerator.unwrap_model(module), master) if t.l2_to_base else None  # θ0, before any resume
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def trainable() -> dict[str, torch.Tensor]:
        """What checkpoints and L2-SP work on: the trainable parameters by name (bf16-master: the fp32 masters)."""
        if master:
            return master.named()
        return {n: p for n, p in accelerator.unwrap_model(module).model.named_parameters() if p.requires_grad}

    # resume
    step, best_eval, bad_evals, initial_eval = 0, None, 0, None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)
    accelerator.wait_for_everyone()
    ckpts = list_checkpoints(out) if resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], trainable(), optimizer, scheduler, rank)
        if master:
            master.to_model()
        if state.get("world_size", world) != world:
            raise RuntimeError(f"{ckpts[-1]} was written by {state['world_size']} processes; resume with the same")
        step, best_eval, bad_evals = state["step"], state.get("best_eval"), state.get("bad_evals", 0)
        initial_eval = state.get("initial_eval")
        if is_main:
            console.print(f"resuming from {ckpts[-1]} (step {step}/{total_steps})")
    else:  # AdamW's moments allocated before the first forward, so the memory peak comes at step 1
        init_adamw_state(optimizer)
    if is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None
    tb = _tensorboard(out, console) if (t.tensorboard and is_main) else None

    def save(step_now: int):
        state = {"step": step_now, "best_eval": best_eval, "bad_evals": bad_evals, "initial_eval": initial_eval}
        save_checkpoint(out, step_now, trainable(), optimizer, scheduler, state, t.keep_last, rank, world,
                        accelerator.wait_for_everyone)

    def log(row: dict):
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])

    def evaluate() -> float | None:
        if not eval_ex:
            return None
        module.eval()
        s = torch.zeros(2, dtype=torch.float64)
        lengths = [len(ex.input_ids) for ex in eval_ex]
        batches = length_grouped_batches(lengths, batch_tokens=None if t.batch_size else t.batch_tokens,
                                         batch_size=t.batch_size, shuffle=False, seed=0)
        with torch.no_grad():
            for i, b in enumerate(batches):
                if i % world != rank:
                    continue
                with accelerator.autocast():
                    ls, ws, _ = module(collate([eval_ex[j] for j in b], cfg, pad_id), kl=False)
                s += torch.tensor([float(ls), float(ws)], dtype=torch.float64)
        s = accelerator.reduce(s.to(accelerator.device), reduction="sum").cpu()
        module.train()
        return float(s[0] / s[1]) if s[1] > 0 else None

    # the loop
    module.train()
    last_loss, eval_loss, t_start = None, None, time.perf_counter()
    if step == 0:
        initial_eval = evaluate()  # the base model's validation loss, for comparison
    if step == 0 and initial_eval is not None:
        log({"step": 0, "eval_loss": initial_eval})
    n_tok_run = 0
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not is_main) as progress:
        bar = progress.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            t0 = time.perf_counter()
            group = stream.step(step)  # this step's micro-batches, all processes
            global_weight = sum(trained_weight([pool[j] for j in b]) for b in group)
            mine = group[rank::world]
            sums = torch.zeros(2, dtype=torch.float64)  # NLL sum, KL sum
            tokens = 0
            for i, b in enumerate(mine):
                batch = collate([pool[j] for j in b], cfg, pad_id)
                tokens += int(batch["input_ids"].numel())
                sync = contextlib.nullcontext() if i == len(mine) - 1 else accelerator.no_sync(module)
                with sync:
                    with accelerator.autocast():
                        ls, _, kl = module(batch)
                    objective = ls if kl is None else ls + t.kl_to_base * kl
                    accelerator.backward(objective * (world / global_weight))
                if master and (world == 1 or i == len(mine) - 1):  # into fp32 (under DDP: after the all-reduce)
                    master.take_grads()
                sums[0] += float(ls.detach())
                if kl is not None:
                    sums[1] += float(kl.detach())
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
            sft_loss, kl_mean = float(sums[0]) / global_weight, float(sums[1]) / global_weight
            # L2-SP: its exact gradient, once per optimizer step, after the micro-batches (and DDP's all-reduce)
            l2 = add_l2_grad(trainable(), anchor, t.l2_to_base) if anchor else 0.0
            loss = sft_loss + t.kl_to_base * kl_mean + l2
            if not math.isfinite(loss):
                kept = list_checkpoints(out)
                raise TrainingDiverged(f"step {step + 1}: loss is {loss}; stopped. Last good checkpoint: "
                                       f"{kept[-1] if kept else 'none'} (lower train.lr or check the data)")
            grad_norm = None
            if t.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(params, t.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if master:
                master.to_model()
            step += 1
            last_loss = loss
            dt = time.perf_counter() - t0
            n_tok_run += tokens
            row = {"step": step, "epoch": step * per_step / stream.per_epoch, "loss": loss,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "trained_tokens": global_weight,
                   "tokens_per_s": tokens * world / dt, "trained_tokens_per_s": global_weight / dt}
            if t.kl_to_base or t.l2_to_base:
                row["sft_loss"] = sft_loss
            if t.kl_to_base:
                row["kl"] = kl_mean  # nats per trained token; `loss` adds kl_to_base times this
            if t.l2_to_base:
                row["l2"] = l2  # the penalty l2_to_base·||θ-θ0||² at this step's weights
            if replay_ex:
                replayed = [pool[j] for b in group for j in b if j >= len(train_ex)]
                row["replay_examples"], row["replay_tokens"] = len(replayed), trained_weight(replayed)
            if step % t.log_every == 0 or step == total_steps:
                log(row)
            progress.update(bar, advance=1, info=f"loss {loss:.4f}  {global_weight / dt:,.0f} trained tok/s")
            if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                eval_loss = evaluate()
                if eval_loss is not None:
                    log({"step": step, "eval_loss": eval_loss})
                    if best_eval is None or eval_loss < best_eval:
                        best_eval, bad_evals = eval_loss, 0
                    else:
                        bad_evals += 1
                    if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                        console.print(f"early stopping at step {step}: eval loss did not improve for {bad_evals} evals")
                        break
            if t.save_every and step % t.save_every == 0 and step < total_steps:
                save(step)

    eval_loss = evaluate()
    if eval_loss is not None:
        log({"step": step, "eval_loss": eval_loss})
    save(step)
    unwrapped = accelerator.unwrap_model(module).model
    optimizer.state.clear()  # AdamW moments are in the checkpoint; free them before the final save
    if master:  # the final model: the exact fp32 masters
        cast_model(unwrapped, torch.float32)
        master.to_model()
    change = weight_change(unwrapped, cfg.model.path, cfg.lora.enabled)
    model_dir = None
    if is_main:
        model_dir = save_final(unwrapped, tokenizer, tmpl, cfg, out)
        summary = {"steps": step, "final_loss": last_loss, "initial_eval_loss": initial_eval, "eval_loss": eval_loss,
                   "weight_change": change,
                   "train_examples": len(train_ex), "eval_examples": len(eval_ex), "data": report.as_dict(),
                   "tasks": sorted({str(ex.task) for ex in train_ex if ex.task is not None}),
                   "data_fingerprint": fingerprint(train_ex), "wall_s": time.perf_counter() - t_start,
                   "model_dir": str(model_dir),
                   "mitigations": {"replay_ratio": t.replay.ratio if t.replay else 0.0, "kl_to_base": t.kl_to_base,
                                   "l2_to_base": t.l2_to_base}}
        if replay_ex:
            summary["replay"] = replay_counts(stream, step, pool, len(train_ex), replay_report)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
        console.print(f"[green]done[/] {step} steps, final loss {last_loss:.4f}"
                      + (f", eval loss {initial_eval:.4f} -> {eval_loss:.4f}" if initial_eval is not None
                         and eval_loss is not None else f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
                      + f", weights moved {change['overall']:.2e} (relative) -> {model_dir}"
                      + mitigations_note(cfg, len(replay_ex)), highlight=False)
    if t.malloc_tuning:
        release_memory()  # the heap kept for reuse while training goes back to the OS
    accelerator.wait_for_everyone()
    return TrainResult(out, step, last_loss, eval_loss, change, model_dir)


def replay_counts(stream: MicroBatchStream, steps: int, pool: list[Example], n_train: int, report: DataReport) -> dict:
    """Replay examples and trained tokens in the steps run (resumed runs included), vs the task data's."""
    weight: dict[int, float] = {}

    def w(j: int) -> float:
        if j not in weight:
            weight[j] = trained_weight([pool[j]])
        return weight[j]

    drawn, task_tokens = [], 0.0
    for k in range(steps):
        for b in stream.step(k):
            drawn += [j for j in b if j >= n_train]
            task_tokens += sum(w(j) for j in b if j < n_train)
    tokens = sum(w(j) for j in drawn)
    return {"pool_examples": len(pool) - n_train, "trained_examples": len(drawn),
            "distinct_examples": len(set(drawn)), "trained_tokens": tokens,
            "token_share": tokens / (tokens + task_tokens) if tokens + task_tokens else 0.0,
            "data_fingerprint": fingerprint(pool[n_train:]), "data": report.as_dict()}


def mitigations_note(cfg: RunConfig, n_replay: int) -> str:
    t, parts = cfg.train, []
    if t.replay is not None:
        parts.append(f"replay {t.replay.ratio:.0%} of {n_replay} examples")
    if t.kl_to_base:
        parts.append(f"KL to base λ={t.kl_to_base:g}")
    if t.l2_to_base:
        parts.append(f"L2-SP λ={t.l2_to_base:g}")
    return f"; mitigations: {', '.join(parts)}" if parts else ""


def fingerprint(examples: list[Example]) -> str:
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def save_final(model, tokenizer, tmpl: ChatTemplate, cfg: RunConfig, out: Path) -> Path:
    """HF-format output: full model dir, or a peft adapter dir; tokenizer carries the training template."""
    eot = end_of_turn_ids(tmpl, tokenizer)
    target = out / ("adapter" if cfg.lora.enabled else "model")
    tmp = out / f".{target.name}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora.enabled:
        model.peft_config["default"].base_model_name_or_path = str(resolve_model(cfg.model.path).resolve())
        model.save_pretrained(tmp)
    else:
        model.config.use_cache = True
        gen = model.generation_config
        gen.eos_token_id = sorted(set(eot + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
        gen.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.chat_template = tmpl.source
    tokenizer.save_pretrained(tmp)
    (tmp / "sftlab_train_config.yaml").write_text(dump_config(cfg))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _tensorboard(out: Path, console: Console):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        console.print("[yellow]train.tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))
