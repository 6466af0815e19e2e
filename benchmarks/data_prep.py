"""Data preparation throughput: sftlab's tokenize+mask (+pack) vs TRL `SFTTrainer`'s own dataset preparation.

Both tools get the same records (a seeded sample of the T0 mixture), the same tokenizer and chat template, and
completion-only loss. TRL is given the records as a conversational prompt/completion dataset, the form for which
`SFTTrainer` applies the chat template and sets `completion_only_loss`; the time is its `_prepare_dataset` (chat
template, tokenize, completion mask, labels, truncation) on an in-memory `Dataset` with caching off, so no run is a
cache hit. sftlab's time is `iter_examples` on the sample file: reading and parsing the JSONL, normalising, stripping
the `<|endoftext|>` artefact, duplicate counting, rendering, tokenizing and masking (+ `pack_best_fit` when
`sftlab/data/packing.py` exists). TRL gets its records already parsed and stripped, outside its timed region, so the
comparison leans in TRL's favour.

Runs alternate A/B/A/B; the figure per tool is the best of `--repeats` runs, with the median reported beside it.
Both outputs are compared example by example: identical `input_ids`, identical trained-token masks. The one known
difference is a template detail: TRL trains every token after the prompt, including the newline ChatML writes after
`<|im_end|>`; sftlab trains the response and `<|im_end|>` but not that separator, which the model never generates.
Mismatches that are only this are counted apart (`mask_diff_trailing_separator_only`).

Progress goes to stderr; stdout gets exactly one JSON line.

    python benchmarks/data_prep.py                      # 5,000 T0 examples, SmolLM2 tokenizer, max length 2048
    python benchmarks/data_prep.py --n 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "t0-mixture"),
                   help="JSONL file or directory of prompt/completion records to sample from")
    p.add_argument("--n", type=int, default=5000, help="number of records to sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--strip", action="append", default=None,
                   help="trailing artefact to strip from completions (repeatable; default '<|endoftext|>')")
    p.add_argument("--model", default="default", help="model whose tokenizer and chat template both tools use")
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per example (both keep the end)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per tool, alternating A/B")
    p.add_argument("--batch-size", type=int, default=256, help="sftlab's tokenizer batch size")
    p.add_argument("--no-pack", action="store_true", help="skip the packing comparison even if packing exists")
    args = p.parse_args(argv)
    if args.strip is None:
        args.strip = ["<|endoftext|>"]
    if args.n < 1 or args.repeats < 1:
        p.error("--n and --repeats must be at least 1")
    return args


def sample_lines(data: str, n: int, seed: int) -> list[bytes]:
    """A seeded sample of `n` raw JSONL lines from a file or directory, in file order."""
    from sftlab.data.load import expand_paths

    lines = []
    for path in expand_paths([data]):
        if path.suffix not in (".jsonl", ".ndjson"):
            raise SystemExit(f"{path}: the benchmark samples JSONL files only")
        with open(path, "rb") as f:
            lines += [raw if raw.endswith(b"\n") else raw + b"\n" for raw in f if raw.strip()]
    if n > len(lines):
        raise SystemExit(f"--n {n}: {data} has only {len(lines)} records")
    picked = sorted(random.Random(seed).sample(range(len(lines)), n))
    return [lines[i] for i in picked]


def trl_records(lines: list[bytes], strip: tuple[str, ...]) -> list[dict]:
    """The sample as TRL's conversational prompt/completion dataset (artefact stripped, as sftlab does)."""
    from sftlab.data.formats import strip_suffixes

    out = []
    for i, raw in enumerate(lines):
        rec = json.loads(raw)
        out.append({"prompt": [{"role": "user", "content": rec["prompt"]}],
                    "completion": [{"role": "assistant", "content": strip_suffixes(rec["completion"], strip)}],
                    "idx": i})
    return out


def pack_function():
    """sftlab's best-fit packing if the module exists yet, else None."""
    try:
        from sftlab.data.packing import pack_best_fit
    except ImportError:
        return None
    return pack_best_fit


def make_trl(tokenizer, max_length: int, packing: bool, workdir: str):
    """An SFTTrainer on a tiny random Llama; its `_prepare_dataset` is the preparation TRL runs on train data."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_length,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keep_end is deprecated in TRL but is what sftlab's truncation does
        args = SFTConfig(output_dir=workdir, max_length=max_length, truncation_mode="keep_end", packing=packing,
                         dataset_num_proc=None, report_to=[], shuffle_dataset=False, use_cpu=True)
        probe = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}],
                                             "completion": [{"role": "assistant", "content": "Hello"}]}])
        trainer = SFTTrainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=probe, processing_class=tokenizer)
    assert trainer.completion_only_loss, "TRL did not pick completion-only loss for prompt/completion data"
    return trainer


def run_trl(trainer, records: list[dict], tokenizer, packing: bool):
    import datasets

    ds = datasets.Dataset.from_list(records)  # in memory: no cache files, and caching is disabled anyway
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer._prepare_dataset(ds, tokenizer, trainer.args, packing, None, "train")
        t1, c1 = time.perf_counter(), time.process_time()
    return out, t1 - t0, c1 - c0


def run_sftlab(path: Path, tokenizer, opts, batch_size: int):
    from sftlab.data.pipeline import DataReport, iter_examples

    report = DataReport()
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = list(iter_examples([path], tokenizer, opts, report, batch_size=batch_size, with_conversation=True))
    t1, c1 = time.perf_counter(), time.process_time()
    return pairs, report, t1 - t0, c1 - c0


def pack_sftlab(examples, pack, max_length: int):
    """sftlab's packing step after tokenizing: the best-fit plan, then the rows materialised as TRL's are
    (concatenated input_ids and labels, segment lengths), so both tools hand the trainer the same thing."""
    t0 = time.perf_counter()
    rows = pack([len(ex.input_ids) for ex in examples], max_length)
    packed = []
    for row in rows:
        ids, labels, lens = [], [], []
        for i in row:
            ids += examples[i].input_ids
            labels += examples[i].labels
            lens.append(len(examples[i].input_ids))
        packed.append((ids, labels, lens))
    return packed, time.perf_counter() - t0


def compare(pairs, trl_ds, n: int) -> dict:
    """Example-by-example agreement of sftlab's and TRL's input_ids and trained-token masks."""
    ours = {conv.where.line - 1: ex for ex, conv in pairs}
    theirs = {row["idx"]: row for row in trl_ds.select_columns(["idx", "input_ids", "labels"])}
    both = sorted(set(ours) & set(theirs))
    tokens_mismatch = mask_mismatch = trailing_only = 0
    first = []
    for i in both:
        a, b = ours[i], theirs[i]
        if a.input_ids != b["input_ids"]:
            tokens_mismatch += 1
            if len(first) < 3:
                first.append({"idx": i, "what": "input_ids"})
            continue
        ma = [x != IGNORE for x in a.labels]
        mb = [x != IGNORE for x in b["labels"]]
        if ma != mb:
            mask_mismatch += 1
            diff = [k for k in range(len(ma)) if ma[k] != mb[k]]
            last_ours = max(k for k in range(len(ma)) if ma[k])
            if all(k > last_ours and mb[k] and not ma[k] for k in diff):
                trailing_only += 1
            elif len(first) < 3:
                first.append({"idx": i, "what": "mask", "positions": diff[:8]})
    return {"compared": len(both), "only_sftlab": len(set(ours) - set(theirs)),
            "only_trl": len(set(theirs) - set(ours)), "tokens_match": len(both) - tokens_mismatch,
            "tokens_mismatch": tokens_mismatch, "mask_match": len(both) - tokens_mismatch - mask_mismatch,
            "mask_mismatch": mask_mismatch, "mask_diff_trailing_separator_only": trailing_only,
            "first_mismatches": first}


def main(argv=None) -> dict:
    args = parse_args(argv)
    err = Console(stderr=True)
    from sftlab.config import DataConfig
    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    strip = tuple(args.strip)
    lines = sample_lines(args.data, args.n, args.seed)
    records = trl_records(lines, strip)
    pack = None if args.no_pack else pack_function()
    opts = DataConfig(strip=strip, skip_invalid=True, max_length=args.max_length)
    times: dict[str, list[float]] = {"sftlab": [], "trl": [], "sftlab_cpu": [], "trl_cpu": [],
                                      "sftlab_pack": [], "trl_pack": []}

    with tempfile.TemporaryDirectory(prefix="sftlab-bench-") as tmp:
        sample = Path(tmp) / "sample.jsonl"
        sample.write_bytes(b"".join(lines))
        trainer = make_trl(tokenizer, args.max_length, False, tmp)
        trainer_pack = make_trl(tokenizer, args.max_length, True, tmp) if pack is not None else None
        # A/B/A/B: one sftlab run (tokenize, then pack its output), then TRL unpacked (and TRL packed).
        runs = [tool for _ in range(args.repeats) for tool in ("sftlab", "trl") + (("trl_pack",) if pack else ())]
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("runs"), TimeElapsedColumn(), console=err) as progress:
            bar = progress.add_task("benchmark A/B", total=len(runs))
            for tool in runs:
                note = ""
                if tool == "sftlab":
                    pairs, report, dt, cpu = run_sftlab(sample, tokenizer, opts, args.batch_size)
                    times["sftlab_cpu"].append(cpu)
                    if pack is not None:
                        packed, dt_pack = pack_sftlab([ex for ex, _ in pairs], pack, args.max_length)
                        times["sftlab_pack"].append(dt + dt_pack)
                        note = f", packing +{dt_pack:.2f} s"
                elif tool == "trl":
                    trl_ds, dt, cpu = run_trl(trainer, records, tokenizer, False)
                    times["trl_cpu"].append(cpu)
                else:
                    trl_packed, dt, cpu = run_trl(trainer_pack, records, tokenizer, True)
                times[tool].append(dt)
                progress.console.print(f"{tool:>8}: {args.n / dt:8,.0f} examples/s  ({dt:.2f} s wall, "
                                       f"{cpu:.2f} s cpu{note})", highlight=False)
                progress.advance(bar)

    check = compare(pairs, trl_ds, args.n)
    best = {k: min(v) for k, v in times.items() if v}
    result = {
        "n_examples": args.n,
        "sftlab_examples_per_s": round(args.n / best["sftlab"], 1),
        "trl_examples_per_s": round(args.n / best["trl"], 1),
        "ratio": round(best["trl"] / best["sftlab"], 2),
        "tokens_match": check["tokens_match"],
        "mask_match": check["mask_match"],
        "tokens_mismatch": check["tokens_mismatch"],
        "mask_mismatch": check["mask_mismatch"],
        "mask_diff_trailing_separator_only": check["mask_diff_trailing_separator_only"],
        "compared": check["compared"],
        "only_sftlab": check["only_sftlab"],
        "only_trl": check["only_trl"],
        "sftlab_kept": report.kept,
        "sftlab_invalid": dict(report.invalid.counts),
        "sftlab_truncated": report.truncated,
        "median_ratio": round(statistics.median(times["trl"]) / statistics.median(times["sftlab"]), 2),
        "cpu_ratio": round(best["trl_cpu"] / best["sftlab_cpu"], 2),
        "sftlab_s": [round(t, 3) for t in times["sftlab"]],
        "trl_s": [round(t, 3) for t in times["trl"]],
        "repeats": args.repeats,
        "max_length": args.max_length,
        "model": args.model,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    if pack is not None:
        result["sftlab_pack_examples_per_s"] = round(args.n / best["sftlab_pack"], 1)
        result["trl_pack_examples_per_s"] = round(args.n / best["trl_pack"], 1)
        result["pack_ratio"] = round(best["trl_pack"] / best["sftlab_pack"], 2)
        result["sftlab_pack_rows"] = len(packed)
        result["trl_pack_rows"] = len(trl_packed)
    else:
        result["packing"] = "skipped (sftlab.data.packing not available)" if not args.no_pack else "skipped (--no-pack)"
    if check["first_mismatches"]:
        result["first_mismatches"] = check["first_mismatches"]
    err.print(f"[green]done[/] sftlab {result['sftlab_examples_per_s']:,.0f} vs TRL {result['trl_examples_per_s']:,.0f} "
              f"examples/s = {result['ratio']}x; ids match {check['tokens_match']}/{check['compared']}, masks match "
              f"{check['mask_match']}/{check['compared']} (+{check['mask_diff_trailing_separator_only']} differing "
              "only in the separator after <|im_end|>)", highlight=False)
    from machine import cpu_facts  # benchmarks/machine.py

    result["machine"] = cpu_facts()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
