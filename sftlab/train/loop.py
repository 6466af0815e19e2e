"""The SFT recipe, top to bottom: `train` = `setup` -> `restore` -> `fit` (steps, validation, checkpoints) ->
`finish` (final validation and checkpoint, weight change, HF export, summary).

Loss normalisation: the loss of an optimizer step is the sum of per-token NLL over *all* trained tokens
of the global batch (every micro-batch of every process) divided by their count (or weight sum). Each
process knows the whole step's token count in advance (the batch plan is deterministic), so every
micro-batch backpropagates `its NLL sum / global count * world_size` (DDP averages gradients over
processes); nothing is a mean of per-micro-batch means.

Exact resume: the micro-batch stream is a pure function of (seed, epoch) (`plan.py`), so the step number is the
data position; parameters, optimizer, scheduler and RNG states come from the checkpoint.

Preemption: SIGTERM, SIGINT and SIGUSR1 (what SLURM and Kubernetes send before a kill) let the current optimizer
step finish, write a checkpoint and raise `TrainingInterrupted`; a second signal stops at once (the previous
checkpoint stays intact). On resume, metrics.jsonl is cut back to what it held when the checkpoint was written, so
no step is logged twice; an unreadable newest checkpoint is skipped, with a warning, for the one before it. A run
whose outputs are complete for the same config is not trained again. One process writes an output directory at a
time (`io.output_lock`).

The recipe takes its epoch planner and its loss as arguments (`train(cfg, planner=..., loss=...)`): a benchmark
or a test varies them by passing other functions. Forgetting mitigations (replay, KL to base, L2-SP) live in
`mitigations.py`; each is one call at its place in the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ..config import RunConfig, dump_config
from ..data.pipeline import DataReport, iter_examples
from ..data.prepared import (Built, Chained, Examples, Prepared, fingerprint, open_entry, prepare, prepared_line,
                             tasks_of)
from ..data.template import resolve_template
from ..data.tokenize import Example
from ..io import atomic_write, output_lock, progress
from ..models import bf16_native, load_tokenizer
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, remove_partial, save_checkpoint
from .components import apply_lora, load_training_model, lr_lambda
from .lifecycle import TrainingInterrupted, completed, config_hash, stop_requested, stop_signals
from .drift import DriftProbe, build_probe, drift_kl, probe_examples
from .sharding import full_state_dict, gathered, scalar, shard
from .loss import TokenObjective, sft_loss_sum
from .objective import LossFn, SFTLossModule
from .mitigations import (add_l2_grad, frozen_copy, l2_anchor, mitigations_note, needs_base_copy, prepare_replay,
                          replay_counts, replay_share)
from .outputs import MetricsLog, save_final, summary_line
from .plan import EpochPlanner, MicroBatchStream, collate, epoch_batches, trained_weight, validation_batches
from .precision import MasterWeights, cast_model
from .runtime import init_adamw_state, release_memory, reset_accelerate_state, tune_malloc


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    initial_eval_loss: float | None = None
    train_examples: int = 0
    weight_change: dict = field(default_factory=dict)
    model_dir: Path | None = None


@dataclass
class Setup:
    """Everything `setup` builds: the accelerator, data, batch plan, model (wrapped with its loss), optimizer."""
    accelerator: object
    tokenizer: object
    template: object
    train_ex: Examples
    eval_ex: Examples
    replay_ex: list[Example]
    report: DataReport
    replay_report: DataReport | None
    stream: MicroBatchStream
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    master: MasterWeights | None
    params: list[torch.Tensor]  # what the optimizer steps: the fp32 masters, or the model's trainable parameters
    anchor: dict | None  # θ0 of L2-SP
    pad_id: int
    drift: DriftProbe | None = None  # the running forgetting proxy's probe sets (train.drift_examples)
    sharded: bool = False  # train.fsdp: the module is FSDP2-sharded (`sharding.py`)

    @property
    def pool(self) -> Chained:  # micro-batch index len(train_ex) + j is replay example j
        return Chained(self.train_ex, self.replay_ex)

    def trainable(self) -> dict[str, torch.Tensor]:
        """What checkpoints and L2-SP work on: the trainable parameters by name (bf16-master: the fp32 masters)."""
        if self.master:
            return self.master.named()
        model = self.accelerator.unwrap_model(self.module).model
        return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class State:
    """The trainer state a checkpoint stores besides weights and optimizer."""
    step: int = 0
    best_eval: float | None = None
    bad_evals: int = 0
    initial_eval: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    metrics_bytes: int = 0  # metrics.jsonl's length when the checkpoint was written
    final: bool = False  # the checkpoint is the one `finish` writes (final validation done)
    drift: dict | None = None  # the last forgetting-proxy KLs {set: nats per token}


# ---------------------------------------------------------------------------------------------- the recipe
def train(cfg: RunConfig, console: Console | None = None, resume: bool = True,
          planner: EpochPlanner = epoch_batches, loss: LossFn = sft_loss_sum) -> TrainResult:
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(out) if is_main else contextlib.nullcontext():
        done = completed(out, cfg) if resume else None
        if done is not None:
            console.print(f"[green]complete[/] {out} already holds this run ({done.steps} steps, model in "
                          f"{done.model_dir}); --no-resume trains again", highlight=False, soft_wrap=True)
            return done
        run = setup(cfg, planner, loss, console)
        state = restore(run, cfg, out, resume, console)
        if is_main:
            (out / "config.yaml").write_text(dump_config(cfg))
        log = MetricsLog(out, is_main, cfg.train.tensorboard, console, keep_bytes=state.metrics_bytes)
        try:
            if state.step == 0:
                state.initial_eval = validation_loss(run, cfg)  # the base model's, for comparison
                log_evaluation(run, state, state.initial_eval, log)
            with stop_signals() as stop:
                fit(run, state, cfg, out, log, console, stop)
            return finish(run, state, cfg, out, log, console, time.perf_counter() - t_start)
        finally:
            log.close()


def prepare_data(cfg: RunConfig, tokenizer, accelerator=None, console: Console | None = None
                 ) -> tuple[Examples, Examples, DataReport]:
    """Training and validation examples (data.validation, or a seeded data.validation_fraction of train): with
    data.cache, memory-mapped from the prepared-data cache (built here, by rank 0, on first use); else lists."""
    if not cfg.data.train:
        raise ValueError("data.train is empty: give training data files (data.train=[path, ...])")
    train_ex, report = examples_of(cfg.data.train, tokenizer, cfg.data, accelerator, console, "train data")
    if not len(train_ex):
        raise ValueError("no training examples left after validation and truncation")
    if cfg.data.validation:
        return train_ex, examples_of(cfg.data.validation, tokenizer, cfg.data, accelerator, console,
                                     "validation data")[0], report
    if cfg.data.validation_fraction == 0:
        return train_ex, [], report
    order = list(range(len(train_ex)))
    random.Random(cfg.train.seed).shuffle(order)
    held = sorted(order[:max(1, int(len(train_ex) * cfg.data.validation_fraction))])
    kept = sorted(set(range(len(train_ex))) - set(held))
    if isinstance(train_ex, Prepared):
        return train_ex.select(kept), train_ex.select(held), report
    return [train_ex[i] for i in kept], [train_ex[i] for i in held], report


def examples_of(inputs: list[str], tokenizer, opts, accelerator=None, console: Console | None = None,
                label: str = "data") -> tuple[Examples, DataReport]:
    """The tokenized examples of `inputs` and their data report. With data.cache: the main process finds or builds
    the cache entry (`data.prepared.prepare`) while the others wait for its path, then every process maps it."""
    if not opts.cache:
        report = DataReport()
        return list(iter_examples(inputs, tokenizer, opts, report)), report
    if accelerator is None or accelerator.num_processes == 1:
        built = prepare(inputs, tokenizer, opts, console, label=label)
    else:
        built = _prepared_by_main(inputs, tokenizer, opts, accelerator, console, label)
    if console is not None and (accelerator is None or accelerator.is_main_process):
        console.print(prepared_line(built, label), highlight=False, soft_wrap=True)
    return built.prepared, built.prepared.report()


def _prepared_by_main(inputs: list[str], tokenizer, opts, accelerator, console: Console | None, label: str) -> Built:
    """The main process finds or builds the entry and sends its path (or the error that stopped it) to the others,
    which map it; a process that cannot see that path (a cache on a node-local disk) builds its own copy."""
    from accelerate.utils import broadcast_object_list

    message: list = [None]
    if accelerator.is_main_process:
        try:
            built = prepare(inputs, tokenizer, opts, console, label=label)
            message = [str(built.prepared.path)]
        except Exception as e:  # the others raise it too instead of waiting for a path that never comes
            broadcast_object_list([("error", type(e).__name__, str(e))])
            raise
    broadcast_object_list(message)
    if accelerator.is_main_process:
        return built
    if isinstance(message[0], tuple):
        _, kind, reason = message[0]
        raise (ValueError if kind in ("ValueError", "DataError") else RuntimeError)(
            f"the main process stopped preparing the {label}: {kind}: {reason}")
    t0 = time.perf_counter()
    found = open_entry(Path(message[0]))
    return Built(found, True, time.perf_counter() - t0) if found is not None else prepare(inputs, tokenizer, opts,
                                                                                          label=label)


def setup(cfg: RunConfig, planner: EpochPlanner, loss: LossFn, console: Console | None = None) -> Setup:
    """Accelerator, data and batch plan, model (+ LoRA, KL reference, master weights), optimizer, scheduler."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env == 1:  # one process: a second train() call may use another precision
        reset_accelerate_state()
    if t.malloc_tuning:
        tune_malloc()
    # several processes on a machine without GPUs (torchrun / accelerate launch): gloo on CPU
    accelerator = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no",
                              cpu=not torch.cuda.is_available() and world_env > 1)
    if t.precision == "bf16-master" and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"train.precision=bf16-master works in one process or under DDP; with "
                         f"{accelerator.distributed_type.name} use precision: bf16 (its own mixed precision)")
    if t.fsdp and (t.compile or accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM")):
        raise ValueError("train.fsdp shards with PyTorch's fully_shard itself: no train.compile, and a launch config "
                         "that is not accelerate's FSDP/DeepSpeed plugin "
                         f"(got compile {t.compile}, {accelerator.distributed_type.name})")
    if t.precision != "fp32" and not bf16_native(accelerator.device.type):
        where = "CPU (no AVX-512 BF16 or AMX)" if accelerator.device.type == "cpu" else accelerator.device.type
        warnings.warn(f"train.precision={t.precision}: bf16 is not native on this {where}: bf16 matmuls are "
                      f"emulated, usually slower than fp32 (docs/benchmarks.md, 'CPUs with and without AMX')",
                      stacklevel=2)
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    tmpl = resolve_template(cfg.data.template, tokenizer)
    train_ex, eval_ex, report = prepare_data(cfg, tokenizer, accelerator, console)
    replay_ex, replay_report = prepare_replay(cfg, tokenizer, cfg.data)
    world = accelerator.num_processes
    stream = MicroBatchStream(train_ex, cfg, t.grad_accum * world, world, replay_ex, planner)

    model = load_training_model(cfg, accelerator.device.type)
    model.config.use_cache = False
    base_copy = frozen_copy(model) if needs_base_copy(cfg) else None  # LoRA disables its adapter instead
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    master = None
    # fp32 masters from the weights as loaded, then the model goes bf16 (under train.fsdp: FSDP's own policy)
    if t.precision == "bf16-master" and not t.fsdp:
        master = MasterWeights(model)
        cast_model(model, torch.bfloat16)
        if base_copy is not None:
            cast_model(base_copy, torch.bfloat16)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    drift = None
    if t.drift_examples:  # before any update or restored checkpoint: the base model's distributions
        with accelerator.autocast():
            drift = build_probe(model, drift_sets(cfg, tokenizer, tmpl, train_ex, eval_ex), pad_id,
                                t.loss_chunk_size)
    module = SFTLossModule(model, t.loss_chunk_size, kl=t.kl_to_base > 0, base_model=base_copy, loss=loss,
                           objective=TokenObjective(t.objective, t.eaft_top_k, t.eaft_alpha))
    if t.compile:
        module = torch.compile(module)
    if t.fsdp:  # before the optimizer: sharding replaces the parameters with DTensors
        model.to(accelerator.device)
        shard(module, model, bf16_compute=t.precision == "bf16-master")
    params = master.params if master else [p for p in model.parameters() if p.requires_grad]
    # fused AdamW (one kernel over all parameters) exists for CPU and CUDA tensors in torch >= 2.4
    fused = t.fused_adamw if t.fused_adamw is not None else (
        not t.fsdp and all(p.device.type in ("cpu", "cuda") for p in params))
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stream.steps, int(t.warmup_ratio * stream.steps), t.scheduler))
    if not t.fsdp:  # FSDP2 needs no wrapper: the sharded module is used as it is
        module, optimizer = accelerator.prepare(module, optimizer)
    anchor = l2_anchor(model, base_copy, master) if t.l2_to_base else None  # θ0, before any resume
    return Setup(accelerator, tokenizer, tmpl, train_ex, eval_ex, replay_ex, report, replay_report, stream, module,
                 optimizer, scheduler, master, params, anchor, pad_id, drift, t.fsdp)


def drift_sets(cfg: RunConfig, tokenizer, tmpl, train_ex: list[Example], eval_ex: list[Example]
               ) -> dict[str, list[Example]]:
    """The forgetting proxy's probe sets: held-out (or training) examples, and general-probe gold answers."""
    from ..evaluate.forgetting import read_qa

    t, e = cfg.train, cfg.eval
    name, held = probe_examples(eval_ex, train_ex, t.drift_examples, t.seed)
    sets = {name: held}
    if t.drift_general:
        items = read_qa(t.drift_general, tokenizer, tmpl, e.question_field, e.answer_field, e.qa_prompt,
                        t.drift_examples, cfg.data.skip_invalid, max_length=cfg.data.max_length, seed=t.seed,
                        distractors=0, shots=0)
        sets["general"] = [it.gold[0] for it in items]
    return sets


def restore(run: Setup, cfg: RunConfig, out: Path, resume: bool, console: Console) -> State:
    """The newest complete checkpoint's state (weights, optimizer, scheduler, RNG in place), or a fresh one."""
    acc = run.accelerator
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)
        (out / "summary.json").unlink(missing_ok=True)  # describes a finished run: not this one (yet)
        if not resume:  # start over: no checkpoint or metric of an earlier run is kept
            for old in list_checkpoints(out):
                shutil.rmtree(old)
    acc.wait_for_everyone()
    for path in reversed(list_checkpoints(out)):
        try:
            saved = load_checkpoint(path, run.trainable(), run.optimizer, run.scheduler, acc.process_index)
        except CheckpointError as e:
            if acc.is_main_process:
                console.print(f"[yellow]warning:[/] {e}; skipped, trying the one before", highlight=False,
                              soft_wrap=True)
            continue
        break
    else:  # AdamW's moments allocated before the first forward, so the memory peak comes at step 1
        init_adamw_state(run.optimizer)
        return State()
    if run.master:
        run.master.to_model()
    if saved.get("world_size", acc.num_processes) != acc.num_processes:
        raise RuntimeError(f"{path} was written by {saved['world_size']} processes; resume with the same")
    if acc.is_main_process:
        console.print(f"resuming from {path} (step {saved['step']}/{run.stream.steps})", highlight=False,
                      soft_wrap=True)
    return State(saved["step"], saved.get("best_eval"), saved.get("bad_evals", 0), saved.get("initial_eval"),
                 eval_loss=saved.get("eval_loss"), metrics_bytes=saved.get("metrics_bytes", 0),
                 final=saved.get("final", False), drift=saved.get("drift"))


def fit(run: Setup, state: State, cfg: RunConfig, out: Path, log: MetricsLog, console: Console, stop: dict) -> None:
    """Optimizer steps until the plan's last (or early stopping, or a stop signal: `stop["signal"]`), with
    periodic validation and checkpoints."""
    t, total = cfg.train, run.stream.steps
    with progress("train", console, disable=not run.accelerator.is_main_process) as bar_view:
        bar = bar_view.add_task("train", total=total, completed=state.step, info="")
        while state.step < total:
            t0 = time.perf_counter()
            group = run.stream.step(state.step)  # this step's micro-batches, all processes
            row = train_step(run, group, cfg)
            if not math.isfinite(row["loss"]):
                kept = list_checkpoints(out)
                raise TrainingDiverged(f"step {state.step + 1}: loss is {row['loss']}; stopped. Last good "
                                       f"checkpoint: {kept[-1] if kept else 'none'} (lower train.lr or check the data)")
            state.step += 1
            state.last_loss = row["loss"]
            dt = time.perf_counter() - t0
            tokens = row.pop("tokens")
            row = {"step": state.step, "epoch": state.step * run.stream.per_step / run.stream.per_epoch, **row,
                   "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": tokens / dt,
                   "trained_tokens_per_s": row["trained_tokens"] / dt}
            if run.replay_ex:
                row.update(replay_share(group, run.pool, len(run.train_ex)))
            if state.step % t.log_every == 0 or state.step == total:
                log(row)
            bar_view.update(bar, advance=1, info=f"loss {row['loss']:.4f}  {row['trained_tokens_per_s']:,.0f} "
                                                  "trained tok/s")
            if t.eval_every and state.step % t.eval_every == 0 and state.step < total:
                if validate_and_stop(run, state, cfg, log, console):
                    break
            saved = t.save_every and state.step % t.save_every == 0 and state.step < total
            if saved:
                checkpoint(run, state, cfg, out, log)
            if stop_requested(run.accelerator, stop):
                path = checkpoint(run, state, cfg, out, log) if not saved else list_checkpoints(out)[-1]
                raise TrainingInterrupted(stop["signal"] or "stop signal", state.step, path)


def train_step(run: Setup, group: list[list[int]], cfg: RunConfig) -> dict:
    """One optimizer step: this process's micro-batches forward and backward (normalised by the global batch's
    trained tokens), L2-SP's gradient, clipping, the update. Returns the step's metrics row."""
    t, acc, pool = cfg.train, run.accelerator, run.pool
    world, rank = acc.num_processes, acc.process_index
    global_weight = sum(trained_weight([pool[j] for j in b]) for b in group)
    mine = group[rank::world]
    # FSDP: every forward and backward is collective, so every process runs as many micro-batches; one that has
    # fewer repeats one with weight 0 (DDP syncs on the last micro-batch only and needs no padding)
    pad = -(-len(group) // world) - len(mine) if run.sharded else 0
    sums = torch.zeros(3, dtype=torch.float64)  # objective sum, KL sum, plain NLL sum
    tokens = 0
    for i, b in enumerate(mine + [(mine or group)[-1]] * pad):
        padding = i >= len(mine)
        batch = collate([pool[j] for j in b], t.batching, run.pad_id)
        last = i == len(mine) + pad - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.module):
            with acc.autocast():
                part = run.module(batch)
            objective = part.objective if part.kl is None else part.objective + t.kl_to_base * part.kl
            acc.backward(objective * (0.0 if padding else world / global_weight))
        if run.master and (world == 1 or last):  # into fp32 (under DDP: after the all-reduce)
            run.master.take_grads()
        if padding:
            continue
        tokens += int(batch["input_ids"].numel())
        sums[0] += float(part.objective.detach())
        sums[2] += float(part.nll)
        if part.kl is not None:
            sums[1] += float(part.kl.detach())
    sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    objective_mean, kl_mean, sft_loss = (float(x) / global_weight for x in sums)
    # L2-SP: its exact gradient, once per optimizer step, after the micro-batches (and DDP's all-reduce)
    l2 = add_l2_grad(run.trainable(), run.anchor, t.l2_to_base) if run.anchor else 0.0
    loss = objective_mean + t.kl_to_base * kl_mean + l2
    if not math.isfinite(loss):
        return {"loss": loss}
    grad_norm = scalar(acc.clip_grad_norm_(run.params, t.max_grad_norm)) if t.max_grad_norm else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.master:
        run.master.to_model()
    row = {"loss": loss, "grad_norm": grad_norm, "trained_tokens": global_weight, "tokens": tokens * world}
    if t.kl_to_base or t.l2_to_base or t.objective != "nll":
        row["sft_loss"] = sft_loss  # the plain NLL per trained token (`loss` is what is optimised)
    if t.objective != "nll":
        row["objective"] = objective_mean  # token-weighted NLL per trained token (train.objective)
    if t.kl_to_base:
        row["kl"] = kl_mean  # nats per trained token; `loss` adds kl_to_base times this
    if t.l2_to_base:
        row["l2"] = l2  # the penalty l2_to_base·||θ-θ0||² at this step's weights
    return row


def validation_loss(run: Setup, cfg: RunConfig) -> float | None:
    """Mean NLL per trained token of the validation set (all processes), or None without one."""
    if not run.eval_ex:
        return None
    acc = run.accelerator
    run.module.eval()
    s = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i, b in enumerate(validation_batches(run.eval_ex, cfg)):
            # split over processes; under FSDP every forward is collective: every process runs every batch
            if not run.sharded and i % acc.num_processes != acc.process_index:
                continue
            with acc.autocast():
                part = run.module(collate([run.eval_ex[j] for j in b], cfg.train.batching, run.pad_id), kl=False,
                                  weighted=False)
                nll, weight = part.nll, part.weight
            s += torch.tensor([float(nll), float(weight)], dtype=torch.float64)
    if not run.sharded:
        s = acc.reduce(s.to(acc.device), reduction="sum").cpu()
    run.module.train()
    return float(s[0] / s[1]) if s[1] > 0 else None


def log_evaluation(run: Setup, state: State, eval_loss: float | None, log: MetricsLog) -> None:
    """One metrics row with the validation loss and the forgetting proxy's KLs (`drift.py`), where there are any."""
    row: dict = {"step": state.step}
    if eval_loss is not None:
        row["eval_loss"] = eval_loss
    if run.drift is not None:
        # the model body is called outside the root's forward: under FSDP its root parameters are gathered first
        with run.accelerator.autocast(), gathered(run.module) if run.sharded else contextlib.nullcontext():
            state.drift = drift_kl(run.accelerator.unwrap_model(run.module).model, run.drift)
        row.update({f"drift_kl_{name}": v for name, v in state.drift.items()})
    if len(row) > 1:
        log(row)


def validate_and_stop(run: Setup, state: State, cfg: RunConfig, log: MetricsLog, console: Console) -> bool:
    """Periodic validation; True when early stopping says stop (no improvement for `patience` evaluations)."""
    state.eval_loss = validation_loss(run, cfg)
    log_evaluation(run, state, state.eval_loss, log)
    if state.eval_loss is None:
        return False
    if state.best_eval is None or state.eval_loss < state.best_eval:
        state.best_eval, state.bad_evals = state.eval_loss, 0
    else:
        state.bad_evals += 1
    patience = cfg.train.early_stopping_patience
    if patience and state.bad_evals >= patience:
        console.print(f"early stopping at step {state.step}: eval loss did not improve for {state.bad_evals} evals")
        return True
    return False


def checkpoint(run: Setup, state: State, cfg: RunConfig, out: Path, log: MetricsLog, final: bool = False) -> Path:
    saved = {"step": state.step, "best_eval": state.best_eval, "bad_evals": state.bad_evals,
             "initial_eval": state.initial_eval, "eval_loss": state.eval_loss, "metrics_bytes": log.size(),
             "final": final, "drift": state.drift}
    acc = run.accelerator
    with gathered(run.module) if cfg.train.fsdp else contextlib.nullcontext():  # whole weights, every process
        return save_checkpoint(out, state.step, run.trainable(), run.optimizer, run.scheduler, saved,
                               cfg.train.keep_last, acc.process_index, acc.num_processes, acc.wait_for_everyone,
                               sharded_optimizer=cfg.train.fsdp)


def finish(run: Setup, state: State, cfg: RunConfig, out: Path, log: MetricsLog, console: Console,
           wall_s: float) -> TrainResult:
    """Final validation and checkpoint, the exact final weights, weight change, HF export and summary.json."""
    from .weights import weight_change

    if not state.final:  # resumed from the final checkpoint: its validation is logged already
        state.eval_loss = validation_loss(run, cfg)
        log_evaluation(run, state, state.eval_loss, log)
        checkpoint(run, state, cfg, out, log, final=True)
    model = run.accelerator.unwrap_model(run.module).model
    run.optimizer.state.clear()  # AdamW moments are in the checkpoint; free them before the final save
    full = None
    if cfg.train.fsdp:  # the final weights whole: the HF export's state dict, and in the model for the weight change
        full = full_state_dict(model)
        with gathered(run.module, reshard=False):
            pass
    if run.master:  # the final model: the exact fp32 masters
        cast_model(model, torch.float32)
        run.master.to_model()
    change = weight_change(model, cfg.model.path, cfg.lora.enabled)
    result = TrainResult(out, state.step, state.last_loss, state.eval_loss, state.initial_eval, len(run.train_ex),
                         change)
    if run.accelerator.is_main_process:
        result.model_dir = save_final(model, run.tokenizer, run.template, cfg, out, full)
        write_summary(run, state, cfg, result, wall_s)
        console.print(summary_line(result) + mitigations_note(cfg, len(run.replay_ex)), highlight=False)
    if cfg.train.malloc_tuning:
        release_memory()  # the heap kept for reuse while training goes back to the OS
    run.accelerator.wait_for_everyone()
    return result


def write_summary(run: Setup, state: State, cfg: RunConfig, result: TrainResult, wall_s: float) -> None:
    t = cfg.train
    summary = {"steps": result.steps, "final_loss": result.final_loss, "initial_eval_loss": result.initial_eval_loss,
               "eval_loss": result.eval_loss, "weight_change": result.weight_change,
               "train_examples": len(run.train_ex), "eval_examples": len(run.eval_ex), "data": run.report.as_dict(),
               "tasks": sorted(str(task) for task in tasks_of(run.train_ex) if task is not None),
               "data_fingerprint": fingerprint(run.train_ex), "wall_s": wall_s, "model_dir": str(result.model_dir),
               "config_sha256": config_hash(cfg),
               "mitigations": {"replay_ratio": t.replay.ratio if t.replay else 0.0, "kl_to_base": t.kl_to_base,
                               "l2_to_base": t.l2_to_base},
               "drift_kl": state.drift,
               "objective": {"kind": t.objective, **({"top_k": t.eaft_top_k, "alpha": t.eaft_alpha}
                                                     if t.objective == "eaft" else {})}}
    if run.replay_ex:
        summary["replay"] = replay_counts(run.stream, state.step, run.pool, len(run.train_ex), run.replay_report,
                                          fingerprint(run.replay_ex))
    with atomic_write(result.output_dir / "summary.json") as f:
        f.write(json.dumps(summary, indent=2))


