"""Training throughput: sftlab's training loop vs TRL `SFTTrainer` on identical steps (issue 6).

Both tools train the same model (fp32 master weights), on the same examples, step for step: a seeded sample of
the T0 mixture with its real length distribution (`<|endoftext|>` stripped), tokenized and masked once by sftlab's
data layer, cut into sftlab's own batch plan (`epoch_batches`: length-grouped, `--batch-size` examples a step).
TRL gets exactly those examples in exactly that order (pre-tokenized `input_ids` + `completion_mask`,
`completion_only_loss=True`, sequential sampler), so every optimizer step of both tools trains the same tokens
with the same labels; both runs check this step by step (`identical_steps`). Same max length, same precision
(bf16 compute, fp32 master weights and AdamW state: TRL by autocast, sftlab by `train.precision=bf16-master`;
or `--precision fp32`), SDPA attention (sftlab's `auto`; `segments` in the ablation's packed rows),
gradient checkpointing off, eval off, no saving inside the timed steps. TRL runs in each of `--trl-modes` and the
best is compared:
  padding       the step's examples right-padded to the longest (TRL's default collator)
  padding_free  the step's examples flattened into one row with restarting position ids (what TRL's
                packing + padding_free produces, on the same examples as sftlab's step)
  packing       TRL's own BFD packing into rows of --max-length, --batch-size rows a step (different steps:
                the trained-token rate is still comparable, the first-batch loss is not)

Every run is its own subprocess (peak RSS = that process's ru_maxrss; on CUDA, max allocated), alternating
sftlab, TRL, sftlab, TRL for `--rounds`; the first `--warmup` steps of each run are not timed. Throughput is
trained tokens (targets of the loss) per second; per tool the best round is reported, with every round beside it.
sftlab's achieved model FLOP/s counts the work the objective needs: 6·N_body·(real input tokens) + 6·H·V·(trained
targets: the LM head is only needed there) + causal attention 6·L·d_attn·Σ n_i² per example; its fraction of the
matmul peak measured in the same run (large square matmul, `--threads` threads) is the MFU. `ceiling` is the
hardware limit for this model's step, measured in the run too: the model's own matmul shapes at the steps' mean
tokens plus sftlab's optimizer step, everything else free, give the highest MFU any implementation could reach.

`--ablation` instead runs sftlab variants side by side (full, autocast, -malloc tuning, -fused AdamW, fp32,
-length grouping, -chunked CE, packed rows, flash instead of the bmm attention kernel, HF sdpa / eager
attention, +torch.compile; see docs/benchmarks.md) and prints their own JSON line.

Progress goes to stderr; stdout gets exactly one JSON line.

    python benchmarks/vs_trl.py --steps 4 --warmup 1 --rounds 1              # default model, CPU, bf16
    python benchmarks/vs_trl.py --arch tiny --steps 2 --warmup 1 --rounds 1   # smoke test, random tiny model
    python benchmarks/vs_trl.py --device cuda --arch qwen2.5-0.5b --steps 20 --batch-size 16 --rounds 2
    python benchmarks/vs_trl.py --ablation --arch tiny --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
TRL_MODES = ("padding", "padding_free", "packing")
VARIANTS = ("full", "autocast", "no_malloc_tuning", "unfused_adamw", "fp32", "random_batches", "full_logits_ce",
            "packed", "compile", "flash_attention", "sdpa_attention", "eager_attention")

# Architectures built from a config with random weights (throughput does not depend on the values).
ARCHS = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model dir, .gguf or 'default' (also the tokenizer for --arch)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="train a randomly initialised model of this architecture")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "t0-mixture"),
                   help="JSONL file or directory of prompt/completion records to sample from")
    p.add_argument("--strip", action="append", default=None,
                   help="trailing artefact stripped from completions (repeatable; default '<|endoftext|>')")
    p.add_argument("--seed", type=int, default=0, help="sampling, batch order and init seed")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per example")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (one micro-batch)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (each tool once per round)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or fp32, both tools")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--attention", default="auto", help="sftlab's model.attn_implementation (auto, sdpa, "
                   "flash_attention_2, segments, eager); the attention variants of --ablation override it")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run (CPU)")
    p.add_argument("--trl-modes", default="padding,padding_free",
                   help=f"comma-separated TRL batch modes among {','.join(TRL_MODES)}; the best is compared")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate (both tools)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul peak size (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--ablation", action="store_true", help="run sftlab variants instead of the TRL comparison")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"ablation variants among {','.join(VARIANTS)}")
    p.add_argument("--min-free-mb", type=float, default=1024,
                   help="stop a run (reported as failed) when the machine's available memory falls below this")
    p.add_argument("--keep", metavar="DIR", help="keep the work directory (data, plans, run outputs) here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.strip = ["<|endoftext|>"] if args.strip is None else args.strip
    args.trl_modes = [m.strip() for m in args.trl_modes.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [m for m in args.trl_modes if m not in TRL_MODES] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown mode/variant {bad}; TRL modes: {TRL_MODES}, variants: {VARIANTS}")
    if not args.trl_modes or not args.variants:
        p.error("--trl-modes and --variants must name at least one")
    if min(args.steps, args.rounds, args.batch_size, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --batch-size, --threads must be >= 1 and --warmup >= 0")
    if args.ablation and "full" not in args.variants:
        args.variants.insert(0, "full")
    return args


# ---------------------------------------------------------------------------------------------- data, plan
def sftlab_config(spec: dict, variant: str = "full"):
    """The RunConfig sftlab trains with (`variant` switches one optimisation off or on)."""
    from sftlab.config import RunConfig

    packed = variant == "packed"
    # bf16: sftlab's bf16 weights + fp32 master weights and AdamW state (`autocast`: bf16 autocast over fp32)
    precision = {"fp32": "fp32", "autocast": "bf16"}.get(variant, "bf16-master" if spec["precision"] == "bf16"
                                                         else spec["precision"])
    return RunConfig.model_validate({
        "output_dir": spec.get("run_dir", "runs/vs-trl"),
        "model": {"path": spec["model_dir"], "dtype": "fp32",
                  "attn_implementation": {"eager_attention": "eager", "sdpa_attention": "sdpa",
                                          "flash_attention": "segments_flash"}.get(variant,
                                                                                   spec.get("attention", "auto"))},
        "data": {"train": [spec["data_file"]], "strip": spec["strip"], "max_length": spec["max_length"],
                 "skip_invalid": True},
        "train": {"max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "seed": spec["seed"],
                  "precision": precision, "malloc_tuning": variant != "no_malloc_tuning",
                  "fused_adamw": False if variant == "unfused_adamw" else None,
                  "batching": "packed" if packed else "length_grouped",
                  "batch_size": None if packed else spec["batch_size"],
                  "batch_tokens": spec["batch_size"] * spec["max_length"] if packed else None,
                  "grad_accum": 1, "gradient_checkpointing": False, "eval_every": None, "save_every": None,
                  "log_every": 1, "compile": variant == "compile"},
    })


def sample_examples(args, workdir: Path, model_dir: str) -> tuple[Path, list, dict]:
    """A seeded sample of exactly batch_size * total_steps examples that survive sftlab's data layer.

    Records are drawn uniformly from the whole mixture (its real length distribution); the few whose response
    does not fit --max-length are dropped by the data layer (counted) and replaced by further draws.
    Returns the sample file, its examples exactly as `sftlab.train.loop.prepare_data` produces them, and counts.
    """
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_prep import sample_lines

    from sftlab.data.pipeline import DataReport, iter_examples
    from sftlab.models import load_tokenizer
    from sftlab.train.loop import prepare_data

    need = args.batch_size * (args.warmup + args.steps)
    tokenizer = load_tokenizer(model_dir)
    spec = base_spec(args, model_dir, str(workdir / "sample.jsonl"))
    cfg = sftlab_config(spec)
    opts = cfg.data
    pool = sample_lines(args.data, min(max(2 * need, need + 64), _count_lines(args.data)), args.seed)
    cand = workdir / "candidates.jsonl"
    cand.write_bytes(b"".join(pool))
    report = DataReport()
    keep = [conv.where.line - 1 for _, conv in iter_examples([cand], tokenizer, opts, report, with_conversation=True)]
    if len(keep) < need:
        raise SystemExit(f"only {len(keep)} of {len(pool)} sampled records fit --max-length {args.max_length}; "
                         f"{need} are needed (lower --steps/--batch-size or raise --max-length)")
    Path(spec["data_file"]).write_bytes(b"".join(pool[i] for i in keep[:need]))
    examples, _, rep = prepare_data(cfg, tokenizer)
    if len(examples) != need:
        raise SystemExit(f"sftlab kept {len(examples)} of the {need} sampled examples (expected all)")
    counts = {"sampled": len(pool), "dropped_too_long": sum(report.dropped.values()), "truncated": rep.truncated}
    return Path(spec["data_file"]), examples, counts


def _count_lines(data: str) -> int:
    from sftlab.data.load import expand_paths

    return sum(sum(1 for raw in open(p, "rb") if raw.strip()) for p in expand_paths([data]))


def batch_plan(examples: list, spec: dict) -> list[list[int]]:
    """sftlab's micro-batches for the run, step by step (its own planning function, epoch 0)."""
    from sftlab.train.loop import epoch_batches

    total = spec["warmup"] + spec["steps"]
    plan = epoch_batches(examples, sftlab_config(spec), 0)
    if len(plan) != total or any(len(b) != spec["batch_size"] for b in plan):
        raise SystemExit(f"sftlab planned {[len(b) for b in plan]} examples per step; expected {total} steps "
                         f"of {spec['batch_size']}")
    return plan


def random_plan(n_examples: int, batch_size: int, seed: int) -> list[list[int]]:
    """Random-order batches (TRL's default sampler): a seeded permutation cut into batch_size examples."""
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    return [order[k:k + batch_size] for k in range(0, n_examples, batch_size)]


def n_targets(labels: list[int]) -> int:
    """Trained targets of one example: positions t with labels[t+1] != -100 (the loss shifts)."""
    return sum(1 for y in labels[1:] if y != IGNORE)


def step_stats(examples: list, plan: list[list[int]], packed: bool = False) -> list[dict]:
    """Per step: examples, trained targets, real tokens, tokens the model runs over (padded), Σ n² per example."""
    out = []
    for b in plan:
        lens = [len(examples[i].input_ids) for i in b]
        out.append({"examples": len(b), "trained": sum(n_targets(examples[i].labels) for i in b),
                    "real": sum(lens), "padded": sum(lens) if packed else len(b) * max(lens),
                    "sq": sum(n * n for n in lens)})
    return out


def trl_records(examples: list, plan: list[list[int]]) -> list[dict]:
    """The plan's examples in step order, as TRL's pre-tokenized input: input_ids + completion_mask.

    completion_mask[t] = 1 exactly where sftlab's labels[t] != -100, so TRL's labels (input_ids where the mask
    is 1, -100 elsewhere) are sftlab's labels token for token: the response and its <|im_end|>, not the newline
    after it (TRL's own tokenization of prompt/completion data would also train that newline).
    """
    return [{"input_ids": list(examples[i].input_ids),
             "completion_mask": [0 if y == IGNORE else 1 for y in examples[i].labels]} for b in plan for i in b]


# ---------------------------------------------------------------------------------------------- FLOPs
def model_shape(model_dir: str) -> dict:
    """Parameter counts and attention width of a model dir, from its config (meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n_total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is emb
    n_body = n_total - emb.numel() - (0 if tied else head.numel())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"n_params": n_total, "n_body": n_body, "hidden": cfg.hidden_size, "vocab": head.shape[0],
            "layers": cfg.num_hidden_layers, "d_attn": cfg.num_attention_heads * head_dim, "tied": tied}


def step_flops(shape: dict, stat: dict) -> float:
    """Model FLOPs one training step needs (forward + backward = 3x forward).

    body: 6 * N_body per real input token; LM head: 6 * H * V per trained target (the objective needs logits only
    there); causal attention: QK^T and AV over the n(n+1)/2 visible pairs, 2 * 2 * d_attn FLOPs a pair a layer
    forward, i.e. ~6 * L * d_attn * n^2 per example for training. Padding and cross-example attention are not work.
    """
    return (6.0 * shape["n_body"] * stat["real"] + 6.0 * shape["hidden"] * shape["vocab"] * stat["trained"]
            + 6.0 * shape["layers"] * shape["d_attn"] * stat["sq"])


# ---------------------------------------------------------------------------------------------- children
def _threads(spec: dict) -> None:
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])


def _peak_mem(spec: dict) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if spec["device"] == "cuda":
        import torch

        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_matmul(spec: dict) -> dict:
    """Best-of-repeats FLOP/s of one large square matmul, fp32 and bf16."""
    import torch

    _threads(spec)
    dev = spec["device"]
    n = spec["matmul_n"]
    out = {"n": n, "threads": spec["threads"] if dev == "cpu" else None}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        best, spent, reps = float("inf"), 0.0, 0
        while reps < 3 or (spent < 2.0 and reps < 50):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best, spent, reps = min(best, dt), spent + dt, reps + 1
        out[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    return out


def child_ceiling(spec: dict) -> dict:
    """The hardware limit for this model's training step on this machine, measured piece by piece.

    matmul: the model's own linear layers (every distinct shape of one decoder layer, forward + both backward
    matmuls, times the layer count) at the timed steps' mean real tokens, plus the LM head at their mean trained
    targets, in the run's precision; optimizer: sftlab's optimizer step for this model as the run does it
    (bf16: gradients into the fp32 masters, clipping, fused AdamW, masters back to bf16). Attention and every
    element-wise op are counted as free, so flops / (matmul + optimizer) is an upper bound on the achievable MFU.
    """
    from collections import Counter

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.train.precision import MasterWeights, cast_model
    from sftlab.train.runtime import init_adamw_state

    _threads(spec)
    dev = spec["device"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32

    def timed(fn, reps: int = 5) -> float:
        best = float("inf")
        for _ in range(reps):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    def fwd_bwd(m: int, k: int, n: int) -> float:
        x, w, g = (torch.randn(*shape, device=dev).to(dtype) for shape in ((m, k), (n, k), (m, n)))
        return timed(lambda: (x @ w.t(), g @ w, g.t() @ x))

    cfg = AutoConfig.from_pretrained(spec["model_dir"])
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg)
    layer = model.get_decoder().layers[0]
    shapes = Counter((m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear))
    tokens, trained = max(1, round(spec["tokens"])), max(1, round(spec["trained"]))
    head = model.get_output_embeddings().weight
    body_s = sum(c * fwd_bwd(tokens, k, n) for (k, n), c in shapes.items()) * len(model.get_decoder().layers)
    head_s = fwd_bwd(trained, head.shape[1], head.shape[0])
    flops = (6.0 * tokens * sum(c * k * n for (k, n), c in shapes.items()) * len(model.get_decoder().layers)
             + 6.0 * trained * head.shape[0] * head.shape[1])

    master = None
    if dtype == torch.bfloat16:
        master = MasterWeights(model)
        cast_model(model, torch.bfloat16)
    params = master.params if master else [p for p in model.parameters() if p.requires_grad]
    grads_of = master.model_params if master else params
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    init_adamw_state(opt)

    def opt_step():
        if master:
            master.take_grads()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master:
            master.to_model()

    best = float("inf")
    for _ in range(4):
        for p in grads_of:
            p.grad = torch.full_like(p, 1e-3)
        best = min(best, timed(opt_step, reps=1))
    return {"tokens": tokens, "trained": trained, "matmul_s": body_s + head_s,
            "matmul_gflops": flops / (body_s + head_s) / 1e9, "optimizer_s": best}


def full_logits_loss_sum(model, batch: dict, chunk_size: int = 1024):
    """The ablation's "-chunked CE": HF-style loss, LM head over every position, [B, T, V] fp32 logits, then CE.

    Same `(NLL sum, trained count)` contract as `sftlab.train.loss.sft_loss_sum` (no per-token weights:
    the benchmark trains with prompt_loss_weight 0).
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = base.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    logits = base(**inputs, use_cache=False).logits.float()
    targets = batch["labels"].to(device)[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE, reduction="sum")
    return nll, (targets != IGNORE).sum().float()


def child_sftlab(spec: dict) -> dict:
    """One sftlab run through its public training function; per-step timing from its metrics.jsonl."""
    _threads(spec)
    from rich.console import Console

    from sftlab.train.loop import train
    from sftlab.train.loss import sft_loss_sum
    from sftlab.train.plan import epoch_batches

    variant = spec.get("variant", "full")
    cfg = sftlab_config(spec, variant)
    used = {"plan": 0, "loss": 0}
    planner, loss = epoch_batches, sft_loss_sum
    if variant == "random_batches":
        # emulation (see docs/benchmarks.md): the loop's batch planner returns the random-order plan
        plan = spec["plan"]

        def planner(examples, cfg, epoch, *rest):
            used["plan"] += 1
            return [list(b) for b in plan]
    if variant == "full_logits_ce":
        def loss(model, batch, chunk_size=1024):
            used["loss"] += 1
            return full_logits_loss_sum(model, batch, chunk_size)
    if variant == "flash_attention":
        # emulation: sftlab's `segments` attention with its bmm kernel off (every block on SDPA's flash path),
        # registered with transformers under its own name
        from sftlab.attention import Kernels, segments_attention
        from transformers import AttentionInterface

        def counted(*a, **k):
            used["attn"] = used.get("attn", 0) + 1
            return segments_attention(*a, kernels=Kernels(bmm_max_len=0), **k)

        AttentionInterface.register("segments_flash", counted)  # sftlab_config names it for this variant
    t0 = time.perf_counter()
    train(cfg, console=Console(stderr=True, quiet=True), resume=False, planner=planner, loss=loss)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(Path(cfg.output_dir) / "metrics.jsonl") if '"loss"' in line]
    steps = []
    for r in rows:
        dt = r["trained_tokens"] / r["trained_tokens_per_s"]
        steps.append({"dt": dt, "trained": int(round(r["trained_tokens"])), "padded": int(round(r["tokens_per_s"] * dt)),
                      "loss": r["loss"]})
    out = {"steps": steps, "first_loss": steps[0]["loss"] if steps else None, "wall_s": wall, **_peak_mem(spec)}
    if variant == "random_batches":
        out["emulation_used"] = used["plan"] > 0
    if variant == "full_logits_ce":
        out["emulation_used"] = used["loss"] > 0
    if variant == "flash_attention":
        out["emulation_used"] = used.get("attn", 0) > 0
    return out


def child_trl(spec: dict) -> dict:
    """One TRL SFTTrainer run on the plan's examples in plan order; per-step timing from a TrainerCallback."""
    _threads(spec)
    import warnings

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    mode = spec["mode"]

    class StepTimer(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (data loading, forward, backward, step, logging)."""

        def __init__(self):
            self.t = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.t = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.Dataset.from_list(json.loads(Path(spec["trl_data"]).read_text()))
    total = spec["warmup"] + spec["steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SFTConfig(
            output_dir=spec["run_dir"], max_steps=total, per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0, max_grad_norm=1.0,
            bf16=spec["precision"] == "bf16", use_cpu=spec["device"] == "cpu", gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
            seed=spec["seed"], dataloader_num_workers=0, train_sampling_strategy="sequential",
            shuffle_dataset=False, completion_only_loss=True, dataset_num_proc=None,
            padding_free=mode == "padding_free", packing=mode == "packing",
            # padding_free without packing refuses a max_length (inputs are already within --max-length)
            max_length=None if mode == "padding_free" else spec["max_length"])
        timer = StepTimer()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[timer])
    collate, seen = trainer.data_collator, []

    def recording_collator(features):
        batch = collate(features)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        seen.append({"trained": int((batch["labels"][..., 1:] != IGNORE).sum()),
                     "padded": int(batch["input_ids"].numel()), "real": int(real)})
        return batch

    trainer.data_collator = recording_collator  # observe what each step trains; the batch itself is unchanged
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    wall = time.perf_counter() - t0
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    dts = [b - a for a, b in zip(timer.t, timer.t[1:])]
    steps = [{"dt": dt, **seen[k], "loss": losses.get(k + 1)} for k, dt in enumerate(dts)]
    return {"steps": steps, "first_loss": losses.get(1), "wall_s": wall, **_peak_mem(spec)}


CHILDREN = {"matmul": child_matmul, "ceiling": child_ceiling, "sftlab": child_sftlab, "trl": child_trl}


def mem_available_mb() -> float:
    """The kernel's estimate of memory available to new work (inf where /proc/meminfo does not exist)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def run_child(kind: str, spec: dict, workdir: Path, tag: str, min_free_mb: float = 0) -> dict:
    """Run one measurement in a fresh Python process; its result comes back as JSON, or {"error": reason}.

    On a shared machine the run is stopped (and reported as an error) when the memory available to the whole
    machine falls below `min_free_mb`, instead of letting the kernel's OOM killer pick a process.
    """
    spec_file, out_file, log = (workdir / f"{tag}.{x}" for x in ("spec.json", "out.json", "stderr.txt"))
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if spec["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_file), "--out",
           str(out_file)]
    low = None
    with open(log, "w") as errf:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errf)
        while proc.poll() is None:
            free = mem_available_mb()
            if free < min_free_mb:
                low = free
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
    if low is not None:
        return {"error": f"stopped: the machine's available memory fell to {low:.0f} MB (--min-free-mb {min_free_mb:.0f})"}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out_file.read_text())


# ---------------------------------------------------------------------------------------------- summary
def summarise_run(run: dict, expected: list[dict], warmup: int, check_padded: bool = True) -> dict:
    """Timed-step throughput of one run, and whether every step trained exactly the planned tokens."""
    timed = run["steps"][warmup:]
    if not timed:
        raise SystemExit(f"a run logged {len(run['steps'])} steps; nothing left after {warmup} warm-up steps")
    t = sum(s["dt"] for s in timed)
    trained = sum(s["trained"] for s in timed)
    # input tokens the step ran the model over, padding excluded (from the plan; TRL's own packing records them)
    real = sum(s["real"] if "real" in s else e["real"]
               for s, e in zip(timed, expected[warmup:] if expected is not None else timed))
    out = {"trained_tokens_per_s": trained / t, "input_tokens_per_s": real / t, "s_per_step": t / len(timed),
           "trained_tokens": trained, "input_tokens": real, "timed_s": t, "peak_rss_mb": run["peak_rss_mb"],
           "first_loss": run["first_loss"]}
    if "cuda_max_allocated_mb" in run:
        out["cuda_max_allocated_mb"] = run["cuda_max_allocated_mb"]
    if expected is not None:
        same = len(run["steps"]) == len(expected) and all(
            s["trained"] == e["trained"] and (not check_padded or s["padded"] == e["padded"])
            and s.get("real", e["real"]) == e["real"] for s, e in zip(run["steps"], expected))
        out["identical_steps"] = same
    return out


def best_round(rounds: list[dict]) -> dict:
    best = dict(max(rounds, key=lambda r: r["trained_tokens_per_s"]))
    best["rounds_tokens_per_s"] = [round(r["trained_tokens_per_s"], 2) for r in rounds]
    best["median_tokens_per_s"] = statistics.median(r["trained_tokens_per_s"] for r in rounds)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    if "cuda_max_allocated_mb" in rounds[0]:
        best["cuda_max_allocated_mb"] = max(r["cuda_max_allocated_mb"] for r in rounds)
    return best


def flops_fields(shape: dict, expected: list[dict], warmup: int, s_per_step: float, peaks: dict,
                 precision: str) -> dict:
    timed = expected[warmup:]
    flops = sum(step_flops(shape, s) for s in timed) / len(timed)
    achieved = flops / s_per_step
    out = {"model_flops_per_step": flops, "achieved_gflops": achieved / 1e9,
           "fraction_of_bf16_peak": achieved / (peaks["bf16_gflops"] * 1e9)}
    if precision == "fp32":
        out["fraction_of_fp32_peak"] = achieved / (peaks["fp32_gflops"] * 1e9)
    return out


def _r(x, sig: int = 6):
    """Floats to `sig` significant digits, recursively (the JSON line stays short; tiny differences stay visible)."""
    if isinstance(x, float):
        return float(f"{x:.{sig}g}")
    if isinstance(x, dict):
        return {k: _r(v, sig) for k, v in x.items()}
    if isinstance(x, list):
        return [_r(v, sig) for v in x]
    return x


def loss_tolerance(precision: str) -> float:
    """Relative first-batch loss agreement expected between two correct implementations."""
    return 2e-2 if precision == "bf16" else 1e-4


# ---------------------------------------------------------------------------------------------- main
def base_spec(args, model_dir: str, data_file: str) -> dict:
    return {"model_dir": model_dir, "data_file": data_file, "strip": list(args.strip), "max_length": args.max_length,
            "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
            "seed": args.seed, "precision": args.precision, "device": args.device, "threads": args.threads,
            "attention": getattr(args, "attention", "auto")}


def build_arch(arch: str, tokenizer_spec: str, out: Path, seed: int) -> Path:
    """A randomly initialised model of a known architecture, saved with the tokenizer both tools use."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.models import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    kind, kw = ARCHS[arch]
    kw = dict(kw)
    kw.setdefault("vocab_size", len(tok))
    if kw["vocab_size"] < len(tok):
        raise SystemExit(f"--arch {arch}: vocab {kw['vocab_size']} is smaller than the tokenizer's {len(tok)}")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    cfg = AutoConfig.for_model(kind, **kw, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if sum(p.numel() for p in model.parameters()) > 50_000_000:
        model = model.to(torch.bfloat16)  # half the disk; both tools load it as fp32 master weights
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        Path(args.out).write_text(json.dumps(CHILDREN[args.child](spec)))
        return {}
    sys.path.insert(0, str(ROOT))
    from rich.console import Console

    err = Console(stderr=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
    keep = Path(args.keep) if args.keep else None
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="sftlab-vs-trl-")
    workdir = keep or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, err)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args, workdir: Path, err) -> dict:
    import shutil

    from sftlab.models import resolve_model

    if args.arch:
        err.print(f"building a random {args.arch} model")
        model_dir = str(build_arch(args.arch, args.model, workdir / f"model-{args.arch}", args.seed))
    else:
        model_dir = str(resolve_model(args.model).resolve())
    data_file, examples, counts = sample_examples(args, workdir, model_dir)
    spec0 = base_spec(args, model_dir, str(data_file))
    plan = batch_plan(examples, spec0)
    expected = step_stats(examples, plan)
    shape = model_shape(model_dir)
    lens = sorted(len(ex.input_ids) for ex in examples)
    err.print(f"{len(examples)} examples (tokens p50 {lens[len(lens) // 2]}, max {lens[-1]}), "
              f"{len(plan)} steps of {args.batch_size}; model {shape['n_params'] / 1e6:.1f}M params")

    peaks = run_child("matmul", {**spec0, "matmul_n": args.matmul_n or (8192 if args.device == "cuda" else 2048)},
                      workdir, "matmul", args.min_free_mb)
    if "error" in peaks:
        raise SystemExit(f"matmul peak run failed: {peaks['error']}")
    err.print(f"matmul peak: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['bf16_gflops']:.0f} GFLOP/s")

    timed = expected[args.warmup:] or expected
    mean_flops = sum(step_flops(shape, st) for st in timed) / len(timed)
    ceil = run_child("ceiling", {**spec0, "tokens": sum(st["real"] for st in timed) / len(timed),
                                 "trained": sum(st["trained"] for st in timed) / len(timed)},
                     workdir, "ceiling", args.min_free_mb)
    if "error" in ceil:
        raise SystemExit(f"ceiling run failed: {ceil['error']}")
    peak = peaks["bf16_gflops" if args.precision == "bf16" else "fp32_gflops"] * 1e9
    ceiling = {"model_shape_matmul_gflops": ceil["matmul_gflops"], "matmul_s_per_step": ceil["matmul_s"],
               "optimizer_s_per_step": ceil["optimizer_s"],
               f"max_fraction_of_{args.precision}_peak": mean_flops / (ceil["matmul_s"] + ceil["optimizer_s"]) / peak}
    err.print(f"ceiling: the model's matmuls at {ceil['matmul_gflops']:.0f} GFLOP/s ({ceil['matmul_s']:.3g} s a step), "
              f"optimizer {ceil['optimizer_s']:.3g} s -> at most "
              f"{ceiling[f'max_fraction_of_{args.precision}_peak']:.0%} of the {args.precision} peak")

    from machine import cpu_facts  # benchmarks/machine.py

    common = {"model": args.model if not args.arch else f"{args.arch} (random init)", "device": args.device,
              "machine": cpu_facts(),
              "precision": args.precision, "threads": args.threads if args.device == "cpu" else None,
              "examples": len(examples), "batch_size": args.batch_size, "max_length": args.max_length,
              "steps_timed": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
              "n_params": shape["n_params"], "data": {"source": args.data, "seed": args.seed, **counts,
                                                      "tokens_p50": lens[len(lens) // 2], "tokens_max": lens[-1]},
              "matmul_peak": _r(peaks, 4), "ceiling": _r(ceiling, 4)}
    if args.ablation:
        result = _ablation(args, workdir, err, spec0, examples, plan, expected, shape, peaks, common)
    else:
        result = _versus(args, workdir, err, spec0, examples, plan, expected, shape, peaks, common)
    print(json.dumps(result), flush=True)
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    return result


def _schedule(args, names: list[str], workdir: Path, err, make_spec, kind_of) -> dict[str, list[dict]]:
    """Run every name once per round, in order (A/B alternation); failed runs are kept as {"error": ...}."""
    import shutil

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runs: dict[str, list[dict]] = {n: [] for n in names}
    order = [(r, n) for r in range(args.rounds) for n in names]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                  TimeElapsedColumn(), console=err) as progress:
        bar = progress.add_task("A/B runs", total=len(order))
        for r, name in order:
            tag = f"{name}-r{r}"
            spec = make_spec(name, workdir / "runs" / tag)
            res = run_child(kind_of(name), spec, workdir, tag, args.min_free_mb)
            shutil.rmtree(workdir / "runs" / tag, ignore_errors=True)  # checkpoints and final model: GBs
            runs[name].append(res)
            if "error" in res:
                progress.console.print(f"round {r + 1} {name:>16}: [red]failed[/] {res['error'][:300]}")
            else:
                timed = res["steps"][spec["warmup"]:]
                t = sum(s["dt"] for s in timed)
                loss = res["first_loss"]
                progress.console.print(
                    f"round {r + 1} {name:>16}: {sum(s['trained'] for s in timed) / t:8.1f} trained tok/s, "
                    f"{t / max(1, len(timed)):.2f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB, "
                    f"first loss {'-' if loss is None else f'{loss:.5f}'}", highlight=False)
            progress.advance(bar)
    return runs


def _summaries(runs: list[dict], expected, warmup: int) -> dict:
    """Best round of the runs that finished, or the first error if none did."""
    ok = [summarise_run(r, expected, warmup) for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    out = best_round(ok)
    if len(ok) < len(runs):
        out["failed_rounds"] = [r["error"] for r in runs if "error" in r]
    return out


def _versus(args, workdir, err, spec0, examples, plan, expected, shape, peaks, common) -> dict:
    trl_file = workdir / "trl_data.json"
    trl_file.write_text(json.dumps(trl_records(examples, plan)))
    names = ["sftlab"] + [f"trl_{m}" for m in args.trl_modes]

    def make_spec(name, run_dir):
        spec = {**spec0, "run_dir": str(run_dir)}
        if name != "sftlab":
            spec.update(mode=name[4:], trl_data=str(trl_file))
        return spec

    runs = _schedule(args, names, workdir, err, make_spec, lambda n: "sftlab" if n == "sftlab" else "trl")
    per = {}
    for name in names:
        mode = name[4:] if name != "sftlab" else None
        flat = [dict(e, padded=e["real"]) for e in expected] if mode == "padding_free" else expected
        per[name] = _summaries(runs[name], None if mode == "packing" else flat, args.warmup)
    sft = per["sftlab"]
    if "error" in sft:
        raise SystemExit(f"sftlab run failed: {sft['error']}")
    done = [m for m in args.trl_modes if "error" not in per[f"trl_{m}"]]
    best_mode = max(done, key=lambda m: per[f"trl_{m}"]["trained_tokens_per_s"]) if done else None
    trl = per[f"trl_{best_mode}"] if best_mode else {}
    mem_key = "cuda_max_allocated_mb" if args.device == "cuda" else "peak_rss_mb"
    tol = loss_tolerance(args.precision)
    # the first-batch loss of a TRL mode that trained sftlab's first batch (not `packing`)
    la = sft["first_loss"]
    lb = next((per[f"trl_{m}"]["first_loss"] for m in ("padding", "padding_free") if m in done), None)

    def ratio(a, b):
        return a / b if a is not None and b else None

    result = {
        "benchmark": "sftlab_vs_trl",
        "sftlab_trained_tokens_per_s": sft["trained_tokens_per_s"],
        "trl_trained_tokens_per_s": trl.get("trained_tokens_per_s"),
        "trl_best_mode": best_mode,
        "sftlab_input_tokens_per_s": sft["input_tokens_per_s"], "trl_input_tokens_per_s": trl.get("input_tokens_per_s"),
        "tokens_per_s_ratio": ratio(sft["trained_tokens_per_s"], trl.get("trained_tokens_per_s")),
        "sftlab_s_per_step": sft["s_per_step"], "trl_s_per_step": trl.get("s_per_step"),
        f"sftlab_{mem_key}": sft[mem_key], f"trl_{mem_key}": trl.get(mem_key),
        "memory_ratio": ratio(sft[mem_key], trl.get(mem_key)),
        **{f"sftlab_{k}": v for k, v in flops_fields(shape, expected, args.warmup, sft["s_per_step"], peaks,
                                                     args.precision).items()},
        "first_batch_loss": {"sftlab": la, "trl": lb,
                             "rel_diff": abs(la - lb) / abs(lb) if la is not None and lb else None,
                             "match": la is not None and lb is not None and abs(la - lb) <= tol * abs(lb),
                             "tolerance": tol},
        "identical_steps": {n: per[n].get("identical_steps") for n in names},
        "failed": {n: per[n]["error"] for n in names if "error" in per[n]},
        **common,
        "per_tool": {n: {k: v for k, v in per[n].items() if k != "first_loss"} for n in names},
        "timing_note": "best round per tool; CPU shared with other processes unless the machine was quiet",
    }
    summary = (f"sftlab {sft['trained_tokens_per_s']:.2f} trained tok/s; MFU "
               f"{result['sftlab_fraction_of_bf16_peak']:.1%} of the bf16 peak; ")
    if best_mode:
        summary += (f"TRL ({best_mode}) {trl['trained_tokens_per_s']:.2f} -> {result['tokens_per_s_ratio']:.2f}x, "
                    f"memory {result['memory_ratio']:.2f}x")
        if lb is not None:
            summary += f"; first-batch loss {la:.5f} vs {lb:.5f}"
    else:
        summary += "every TRL mode failed"
    err.print(f"[green]done[/] {summary}", highlight=False)
    return _r(result)


def _ablation(args, workdir, err, spec0, examples, plan, expected, shape, peaks, common) -> dict:
    rplan = random_plan(len(examples), args.batch_size, args.seed)
    plans = {v: plan for v in args.variants}
    plans["random_batches"] = rplan
    if "packed" in args.variants:
        from sftlab.train.loop import epoch_batches

        cfg = sftlab_config(spec0, "packed")
        need, rows, epoch = args.warmup + args.steps, [], 0
        while len(rows) < need:  # the loop wraps into the next epoch when the rows run out
            rows += epoch_batches(examples, cfg, epoch)
            epoch += 1
        plans["packed"] = rows[:need]

    def make_spec(name, run_dir):
        spec = {**spec0, "run_dir": str(run_dir), "variant": name}
        if name == "random_batches":
            spec["plan"] = rplan
        return spec

    runs = _schedule(args, args.variants, workdir, err, make_spec, lambda n: "sftlab")
    per = {}
    for v in args.variants:
        exp = step_stats(examples, plans[v], packed=v == "packed")
        per[v] = _summaries(runs[v], exp, args.warmup)
        if "error" in per[v]:
            continue
        per[v].update(flops_fields(shape, exp, args.warmup, per[v]["s_per_step"], peaks,
                                   "fp32" if v == "fp32" else args.precision))
        used = [r["emulation_used"] for r in runs[v] if "emulation_used" in r]
        if used:
            per[v]["emulation_used"] = all(used)
    if "error" in per["full"]:
        raise SystemExit(f"the full sftlab run failed: {per['full']['error']}")
    ok = [v for v in args.variants if "error" not in per[v]]
    full = per["full"]["trained_tokens_per_s"]
    mem_key = "cuda_max_allocated_mb" if args.device == "cuda" else "peak_rss_mb"
    result = {
        "benchmark": "sftlab_ablation",
        "tokens_per_s": {v: per[v]["trained_tokens_per_s"] for v in ok},
        "input_tokens_per_s": {v: per[v]["input_tokens_per_s"] for v in ok},
        "ratio_to_full": {v: per[v]["trained_tokens_per_s"] / full for v in ok},
        mem_key: {v: per[v][mem_key] for v in ok},
        "fraction_of_bf16_peak": {v: per[v]["fraction_of_bf16_peak"] for v in ok},
        "first_loss": {v: per[v]["first_loss"] for v in ok},
        "identical_steps": {v: per[v]["identical_steps"] for v in ok},
        "emulation_used": {v: per[v]["emulation_used"] for v in ok if "emulation_used" in per[v]},
        "failed": {v: per[v]["error"] for v in args.variants if v not in ok},
        **common,
        "per_variant": per,
        "timing_note": "best round per variant; CPU shared with other processes unless the machine was quiet",
    }
    err.print("[green]done[/] " + ", ".join(f"{v} {per[v]['trained_tokens_per_s']:.1f} tok/s "
                                            f"({per[v]['trained_tokens_per_s'] / full:.2f}x)" for v in ok)
              + (f"; failed: {', '.join(result['failed'])}" if result["failed"] else ""), highlight=False)
    return _r(result)


if __name__ == "__main__":
    main()
