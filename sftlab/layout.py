"""Where every stage's files are, named once.

A stage writes into its own directory: `sftlab audit --out DIR`, `sftlab train` (output_dir), `sftlab eval
--out DIR`; `sftlab run` gives each stage a fixed directory of the run directory RUN (`output_dir`):

    RUN/audit/    examples.jsonl, tasks.json, embeddings.npy, audit.json
    RUN/select/   train.jsonl (+ train.summary.json): the selected training set
    RUN/train/    checkpoints/, metrics.jsonl, summary.json, model/ or adapter/, config.yaml
    RUN/eval/     metrics.json, examples.jsonl
    RUN/report.html

The runner, the report (`load_run`), select and eval (a model's training tasks) read through these names.
"""

from __future__ import annotations

from pathlib import Path

# stage directories of a run directory
AUDIT_DIR, SELECT_DIR, TRAIN_DIR, EVAL_DIR = "audit", "select", "train", "eval"
REPORT_FILE = "report.html"

# in an audit directory
AUDIT_EXAMPLES, AUDIT_TASKS, AUDIT_EMBEDDINGS, AUDIT_SUMMARY = "examples.jsonl", "tasks.json", "embeddings.npy", "audit.json"
# in a run's select directory
SELECTED = "train.jsonl"
# in a training output dir
TRAIN_SUMMARY, TRAIN_METRICS, TRAIN_CONFIG = "summary.json", "metrics.jsonl", "config.yaml"
MODEL_DIR, ADAPTER_DIR = "model", "adapter"
# in an eval directory
EVAL_METRICS, EVAL_EXAMPLES = "metrics.json", "examples.jsonl"


def selection_summary(selected: Path) -> Path:
    """FILE.jsonl -> FILE.summary.json, beside the selected training set."""
    selected = Path(selected)
    return selected.with_name(selected.stem + ".summary.json")


def trained_model(train_dir: Path, lora: bool) -> Path:
    """The final weights of a training output dir: `adapter/` for LoRA, else `model/`."""
    return Path(train_dir) / (ADAPTER_DIR if lora else MODEL_DIR)


def audit_outputs(audit_dir: Path) -> tuple[Path, ...]:
    """The files a finished audit has written (and select reads)."""
    return tuple(Path(audit_dir) / name for name in (AUDIT_EXAMPLES, AUDIT_TASKS, AUDIT_EMBEDDINGS))


def training_summary_of(model_dir: Path) -> Path | None:
    """The summary.json of the training that wrote `model_dir` (OUT/model or OUT/adapter -> OUT, or in the dir
    itself), None when there is none."""
    p = Path(model_dir)
    if not p.is_dir():
        return None
    return next((s for s in (p.parent / TRAIN_SUMMARY, p / TRAIN_SUMMARY) if s.is_file()), None)
