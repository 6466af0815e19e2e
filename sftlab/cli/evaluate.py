"""`sftlab audit | select | eval | report | generate | chat`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import AuditConfig, DataConfig, EvalConfig, ModelConfig
from .common import DataArg, ModelOpt, app, console, run_guarded
from .options import data_flags, described, sections

AUDIT_FLAGS = tuple(n for n in AuditConfig.model_fields if n != "enabled")  # `enabled` is `sftlab run`'s
TemplateOpt = Annotated[str, described(DataConfig, "template")]
ModelArg = Annotated[str, typer.Argument(help="HF model dir, a .gguf file, a peft adapter dir, or 'default'")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens generated per reply")]
SampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample instead of greedy decoding")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (with --do-sample)")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --do-sample)")]


@app.command("audit")
@sections(cfg=(AuditConfig, AUDIT_FLAGS),
          data_opts=data_flags(fixed={"loss_on": "last_assistant"}, skip=("prompt_loss_weight",)))
def audit_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Audit directory: examples.jsonl, tasks.json, embeddings.npy, audit.json")],
    model: ModelOpt = "default",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard earlier results in --out instead of resuming")] = False,
    cfg: AuditConfig = None, data_opts: DataConfig = None,
):
    """Measure what the base model already knows: s_cond, s_uncond, IFD per example; verdicts per task."""
    from ..audit.command import run_audit

    run_guarded(lambda: run_audit(data, out, cfg, data_opts, model, overwrite, console))


@app.command("select")
def select_cmd(
    audit_dir: Annotated[Path, typer.Argument(help="Directory written by `sftlab audit`")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL (messages format with task labels)")],
    strategy: Annotated[str, typer.Option("--strategy", help="ifd-top | drop-known | task-balanced | diverse | self-rehearsal")],
    budget: Annotated[str | None, typer.Option("--budget", help="Examples to keep: N or P% of the audited examples (default: all)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random order within strategies")] = 0,
    dup_threshold: Annotated[float, typer.Option("--dup-threshold", help="diverse: MinHash Jaccard at or above which examples are near-duplicates")] = 0.8,
    rehearsal_rouge: Annotated[float | None, typer.Option("--rehearsal-rouge", help="self-rehearsal: also use the base model's answer where its ROUGE-L F to the gold is at least this (default: exact match only)")] = None,
):
    """Choose a training set from an audit; writes FILE.jsonl and FILE.summary.json (kept/dropped per task)."""
    from ..select import run_select

    run_guarded(lambda: run_select(audit_dir, out, strategy, budget, console, seed=seed, dup_threshold=dup_threshold,
                                   rehearsal_rouge=rehearsal_rouge))


@app.command("eval")
@sections(cfg=(EvalConfig, tuple(EvalConfig.model_fields)), model_cfg=(ModelConfig, ("dtype",)),
          data_opts=data_flags(skip=("prompt_loss_weight", "dedup")))
def eval_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Output dir: metrics.json, examples.jsonl")],
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="An evaluation already complete in --out with the same settings is not run again")] = True,
    cfg: EvalConfig = None, model_cfg: ModelConfig = None, data_opts: DataConfig = None,
):
    """Task metrics, general-knowledge probe, perplexity, IFEval; base vs model deltas; writes DIR/metrics.json."""
    from ..evaluate.evaluate import evaluate

    run_guarded(lambda: evaluate(cfg, model, out, data_opts, base=cfg.base, dtype=model_cfg.dtype, console=console,
                                 resume=resume))


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or eval/audit output directories)")],
    out: Annotated[Path, typer.Option("--out", help="Output HTML file (self-contained)")] = Path("report.html"),
    generations: Annotated[int, typer.Option("--generations", help="Side-by-side generations shown per run")] = 5,
):
    """One self-contained HTML report: audit, loss curves, per-task before/after, forgetting, trade-off."""
    from ..report.html import write_report

    run_guarded(lambda: write_report(runs, out, console, generations=generations))


@app.command("generate")
@sections(opts=data_flags(skip=("max_length", "truncation", "loss_on", "prompt_loss_weight", "strip", "dedup")))
def generate_cmd(
    model: ModelArg,
    data: Annotated[list[str], typer.Option("--data", help="Data file(s) in any supported format (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: {index, task, prompt, reference, generation}")],
    max_new_tokens: MaxNewOpt = 128, do_sample: SampleOpt = False, temperature: TempOpt = 1.0, top_p: TopPOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoding together (finished replies "
                                            "leave, waiting prompts join)")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for --do-sample")] = 0,
    opts: DataConfig = None,
):
    """Batched replies for every example; a final assistant turn is dropped from the prompt and kept as reference."""
    from ..evaluate.metrics import exact_match_of_generations
    from ..generate import generate_file
    from ..io import read_jsonl

    def go():
        summary = generate_file(data, model, out, opts, console, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
        rate, n_ref = exact_match_of_generations(read_jsonl(out))
        if rate is not None:
            console.print(f"exact match {rate:.1%} of {n_ref:,} with references", highlight=False)
        return summary

    run_guarded(go)


@app.command("chat")
def chat_cmd(
    model: ModelArg,
    template: TemplateOpt = DataConfig().template,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for the conversation")] = None,
    max_new_tokens: MaxNewOpt = 512, do_sample: SampleOpt = False, temperature: TempOpt = 1.0, top_p: TopPOpt = 1.0,
):
    """Interactive chat on stdin with streaming replies (same template as training); /reset, /exit."""
    from ..chat import chat_loop
    from ..data.template import resolve_template
    from ..models import load_model, load_tokenizer

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read_line() -> str | None:
        console.print("[bold cyan]>>> [/]", end="")
        line = sys.stdin.readline()
        return line if line else None  # "" is end of input

    def go():
        tokenizer = load_tokenizer(model)
        tmpl = resolve_template(template, tokenizer)
        lm = load_model(model)
        console.print(f"chat with [bold]{model}[/] (template {tmpl.name}); /reset clears the history, /exit or "
                      "Ctrl-D leaves", highlight=False)
        history = chat_loop(lm, tokenizer, tmpl, read_line, write, system=system, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p)
        console.print(f"[green]bye[/] ({sum(m['role'] == 'assistant' for m in history)} replies in the last "
                      "conversation)", highlight=False)

    run_guarded(go)
