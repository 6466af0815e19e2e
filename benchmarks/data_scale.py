"""Data at scale (issue 14): a ~1M-example set prepared once, and training from the prepared cache.

The set is the T0 mixture of `../shared/data` repeated `--copies` times, every copy's prompts prefixed with its
copy number so that every example is distinct (50,410 records x 20 = 1,008,200). Measured side by side in one run:

- `sftlab data prepare` with 1 and 2 workers (`data.num_workers`), each into an empty cache: records/s, examples/s,
  wall, peak RSS of the whole process tree (sampled from /proc every 0.2 s), the entry's size on disk;
- TRL's own dataset preparation (`SFTTrainer._prepare_dataset`: chat template, tokenize, completion mask,
  truncation to the same max length) with `dataset_num_proc` 1 and 2 on the same records as a conversational
  prompt/completion dataset (loaded into Arrow outside the timed region, artefact stripped, prefix applied: the
  comparison leans TRL's way); on all of them, or with `--trl-every K` on every K-th record (an even sample of the
  same mix, for a quicker look);
- `sftlab train` (a tiny random-weight Llama with the same tokenizer, packed rows, `--steps` steps: what is
  measured is the data path, not the model) on the prepared 1M set and on its first `--small` records, from a warm
  cache: seconds from process start until the first step's metrics row, the data line the run logs (a cache hit,
  nothing tokenized) and the training process's peak RSS, so the two sizes can be set side by side. RSS is given
  whole (VmRSS: it counts the pages of the memory-mapped entry a process touched, which the kernel may drop) and
  anonymous (RssAnon: what the processes allocated).

"1 worker" is sftlab's default in-process build, where the tokenizers library may use its own thread pool for a
batch (TOKENIZERS_PARALLELISM unset, as for a user); with 2 workers each worker process tokenizes on one thread.
TRL's `dataset_num_proc=None` tokenizes one example per call.

Progress goes to stderr; stdout gets one JSON line.

    python benchmarks/data_scale.py                              # 1M examples, TRL on all of them
    python benchmarks/data_scale.py --copies 2 --trl-every 10    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_facts  # noqa: E402  (benchmarks/machine.py)

STRIP = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "t0-mixture"),
                   help="directory of prompt/completion JSONL files (the T0 mixture)")
    p.add_argument("--copies", type=int, default=20, help="copies of the data, each with its own prompt prefix")
    p.add_argument("--workers", default="1,2", help="worker counts to prepare with (and TRL's dataset_num_proc)")
    p.add_argument("--trl-every", type=int, default=1, help="TRL prepares every K-th record (default: all of them)")
    p.add_argument("--small", type=int, default=10_000, help="examples of the small set trained for the RSS check")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each training run")
    p.add_argument("--model", default="default", help="whose tokenizer and chat template the data gets")
    p.add_argument("--workdir", default=None, help="where the set, caches and runs go (default: a temp dir, removed)")
    p.add_argument("--skip-trl", action="store_true")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.copies < 1 or min(args.workers) < 1 or args.trl_every < 1:
        p.error("--copies, --workers and --trl-every must be at least 1")
    return args


def build_set(data: Path, copies: int, out: Path, trl_out: Path, trl_every: int | None, small: int,
              small_out: Path) -> tuple[int, int]:
    """The repeated set as sftlab reads it (prompt/completion JSONL), the same records (every `trl_every`-th; None:
    none) as TRL's conversational prompt/completion JSONL, and the first `small` records as the small set."""
    files = sorted(data.glob("*.jsonl"))
    n = n_trl = 0
    with open(out, "w") as f, open(trl_out, "w") as g, open(small_out, "w") as s:
        for c in range(copies):
            for path in files:
                for line in open(path, encoding="utf-8"):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    rec["prompt"] = f"[{c}] {rec['prompt']}"
                    row = json.dumps(rec) + "\n"
                    f.write(row)
                    if n < small:
                        s.write(row)
                    if trl_every is not None and n % trl_every == 0:
                        n_trl += 1
                        completion = rec["completion"].removesuffix(STRIP)
                        g.write(json.dumps({"prompt": [{"role": "user", "content": rec["prompt"]}],
                                            "completion": [{"role": "assistant", "content": completion}]}) + "\n")
                    n += 1
    return n, n_trl


def build_tiny_model(model: str, out: Path) -> Path:
    """A 2-layer random-weight Llama saved with `model`'s tokenizer (and chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.models import load_tokenizer

    tok = load_tokenizer(model)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of a process and all its descendants, MB: all of it (/proc/PID/status VmRSS, which counts
    the pages of mapped files it touched) and its anonymous part (RssAnon: what it allocated itself)."""
    kids, todo, total, anon = _children(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
        except OSError:
            pass
    return total / 1024, anon / 1024


def run_sampled(cmd: list[str], err: Console, label: str, watch: Path | None = None, env: dict | None = None
                ) -> dict:
    """Run `cmd`, sampling its process tree's RSS; with `watch`, also the seconds until that file has a step's row
    (sampled every 0.2 s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    peak, peak_anon, first = 0.0, 0.0, None
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    last_print = t0
    while proc.poll() is None:
        rss, anon = tree_rss_mb(proc.pid)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        if watch is not None and first is None and watch.is_file() and b'"step"' in watch.read_bytes():
            first = time.perf_counter() - t0
        if time.perf_counter() - last_print > 30:
            err.print(f"  {label}: {time.perf_counter() - t0:.0f} s, RSS {peak:,.0f} MB", highlight=False)
            last_print = time.perf_counter()
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak, "peak_anon_mb": peak_anon, "first_s": first, "output": out}


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def sftlab_prepare(data: Path, workers: int, cache: Path, model: str, err: Console) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "sftlab", "data", "prepare", str(data), "--out", str(cache), "--model", model,
           "--strip", STRIP, "--skip-invalid", "--num-workers", str(workers)]
    r = run_sampled(cmd, err, f"sftlab prepare x{workers}", env={"SFTLAB_LOG_EVERY": "60"})
    entry = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    meta = json.loads((entry / "meta.json").read_text())
    records = meta["report"]["records"]
    return {"workers": workers, "records": records, "examples": meta["examples"], "tokens": meta["tokens"],
            "wall_s": round(r["wall_s"], 1), "build_s": round(meta["build_seconds"], 1),
            "records_per_s": round(records / r["wall_s"], 1), "examples_per_s": round(meta["examples"] / r["wall_s"], 1),
            "peak_rss_mb": round(r["peak_rss_mb"]), "peak_anon_mb": round(r["peak_anon_mb"]),
            "cache_mb": round(du_mb(entry)), "entry": str(entry)}


TRL_CHILD = r'''
import json, sys, time, warnings
sys.path.insert(0, {bench!r})
import datasets
from data_prep import make_trl
from sftlab.models import load_tokenizer
datasets.disable_caching()
tok = load_tokenizer({model!r})
ds = datasets.load_dataset("json", data_files={data!r}, split="train")
trainer = make_trl(tok, 1024, False, {workdir!r})
args = trainer.args
args.dataset_num_proc = {procs}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    out = trainer._prepare_dataset(ds, tok, args, False, None, "train")
    dt = time.perf_counter() - t0
print("RESULT " + json.dumps({{"records": len(ds), "examples": len(out), "seconds": dt}}))
'''


def trl_prepare(data: Path, procs: int, model: str, workdir: Path, err: Console) -> dict:
    code = TRL_CHILD.format(bench=str(ROOT / "benchmarks"), model=model, data=str(data), workdir=str(workdir),
                            procs=procs if procs > 1 else None)
    r = run_sampled([sys.executable, "-c", code], err, f"TRL prepare x{procs}",
                    env={"HF_DATASETS_CACHE": str(workdir / "hf-cache")})
    res = json.loads(next(line for line in r["output"].splitlines() if line.startswith("RESULT "))[7:])
    return {"procs": procs, "records": res["records"], "seconds": round(res["seconds"], 1),
            "records_per_s": round(res["records"] / res["seconds"], 1), "peak_rss_mb": round(r["peak_rss_mb"])}


def sftlab_train(data: Path, cache: Path, out: Path, model: str, steps: int, err: Console, label: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sftlab", "train", f"model.path={model}", f"data.train=[{data}]",
           f"data.strip=[{STRIP}]", "data.skip_invalid=true", f"data.cache_dir={cache}", f"train.max_steps={steps}",
           "train.batching=packed", "train.batch_tokens=2048", "train.lr=1e-4", f"output_dir={out}"]
    r = run_sampled(cmd, err, label, watch=out / "metrics.jsonl", env={"SFTLAB_LOG_EVERY": "5"})
    data_line = next((line.strip() for line in r["output"].splitlines() if "train data:" in line), "")
    return {"first_step_s": round(r["first_s"], 1) if r["first_s"] else None, "wall_s": round(r["wall_s"], 1),
            "peak_rss_mb": round(r["peak_rss_mb"]), "peak_anon_mb": round(r["peak_anon_mb"]),
            "cache_hit": "nothing tokenized" in data_line,
            "data_line": data_line}


def main(argv=None) -> dict:
    args = parse_args(argv)
    err = Console(stderr=True)
    import tempfile

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sftlab-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        full, trl_set, small = work / "t0-x.jsonl", work / "t0-x-trl.jsonl", work / "t0-small.jsonl"
        err.print(f"building the set ({args.copies} copies of {args.data}) in {work}", highlight=False)
        n, n_trl = build_set(Path(args.data), args.copies, full, trl_set, None if args.skip_trl else args.trl_every,
                             args.small, small)
        tiny = build_tiny_model(args.model, work / "tiny-llama")
        result: dict = {"benchmark": "data_scale", "records": n, "set_mb": round(full.stat().st_size / 2**20),
                        "trl_every": args.trl_every, "sftlab": [], "trl": []}
        cache = work / "cache"
        for w in args.workers:
            r = sftlab_prepare(full, w, work / f"cache-{w}", str(tiny), err)
            err.print(f"sftlab prepare x{w}: {r['records_per_s']:,.0f} records/s, peak RSS {r['peak_rss_mb']:,} MB, "
                      f"cache {r['cache_mb']:,} MB", highlight=False)
            result["sftlab"].append(r)
        if not args.skip_trl:
            for w in args.workers:
                r = trl_prepare(trl_set, w, str(tiny), work, err)
                err.print(f"TRL prepare x{w}: {r['records_per_s']:,.0f} records/s on {r['records']:,} records, "
                          f"peak RSS {r['peak_rss_mb']:,} MB", highlight=False)
                result["trl"].append(r)
            result["speedup_vs_trl"] = {str(s["workers"]): round(s["records_per_s"] / t["records_per_s"], 2)
                                        for s, t in zip(result["sftlab"], result["trl"])}
        os.replace(work / f"cache-{args.workers[-1]}", cache)
        # warm cache: the small set is prepared first (not timed), then each run starts from its entry
        subprocess.run([sys.executable, "-m", "sftlab", "data", "prepare", str(small), "--out", str(cache),
                        "--model", str(tiny), "--strip", STRIP, "--skip-invalid"], check=True,
                       capture_output=True)
        result["train_full"] = sftlab_train(full, cache, work / "run-full", str(tiny), args.steps, err,
                                            "train (full)")
        result["train_small"] = sftlab_train(small, cache, work / "run-small", str(tiny), args.steps, err,
                                             "train (small)")
        result["train_small"]["examples"] = args.small
        for kind in ("rss", "anon"):
            result[f"train_{kind}_ratio_full_vs_small"] = round(result["train_full"][f"peak_{kind}_mb"]
                                                                / result["train_small"][f"peak_{kind}_mb"], 3)
        result["machine"] = cpu_facts()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
