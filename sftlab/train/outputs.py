"""What a training run leaves in its output directory besides checkpoints: metrics.jsonl (and TensorBoard),
summary.json and the final HF-format model or adapter (written under a temporary name, renamed when complete)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from ..config import RunConfig, dump_config
from ..data.template import ChatTemplate, end_of_turn_ids
from ..models import resolve_model


class MetricsLog:
    """Rows appended to OUT/metrics.jsonl (flushed per row) and, with train.tensorboard, TensorBoard scalars;
    on processes other than rank 0 it writes nothing."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, console: Console, keep_bytes: int = 0):
        """`keep_bytes`: the length metrics.jsonl had when the checkpoint resumed from was written; what was
        logged after it (steps that are now run again) is cut off, so no step appears twice."""
        self.file = None
        if enabled:
            self.file = open(out / "metrics.jsonl", "a+b")
            self.file.truncate(min(keep_bytes, self.file.seek(0, 2)))
            self.file.seek(0, 2)
        self.tb = _tensorboard(out, console) if (enabled and tensorboard) else None

    def size(self) -> int:
        """Bytes written so far (what a checkpoint records, to cut back to on resume)."""
        return self.file.tell() if self.file else 0

    def __call__(self, row: dict) -> None:
        if self.file:
            self.file.write((json.dumps(row) + "\n").encode())
            self.file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _tensorboard(out: Path, console: Console):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        console.print("[yellow]train.tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def save_final(model, tokenizer, tmpl: ChatTemplate, cfg: RunConfig, out: Path,
               state_dict: dict | None = None) -> Path:
    """HF-format output: full model dir, or a peft adapter dir; tokenizer carries the training template.
    state_dict: the weights to write instead of the model's own (FSDP: gathered whole, `sharding.full_state_dict`)."""
    eot = end_of_turn_ids(tmpl, tokenizer)
    target = out / ("adapter" if cfg.lora.enabled else "model")
    tmp = out / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora.enabled:
        model.peft_config["default"].base_model_name_or_path = str(resolve_model(cfg.model.path).resolve())
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    else:
        model.config.use_cache = True
        gen = model.generation_config
        gen.eos_token_id = sorted(set(eot + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
        gen.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.chat_template = tmpl.source
    tokenizer.save_pretrained(tmp)
    (tmp / "sftlab_train_config.yaml").write_text(dump_config(cfg))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def summary_line(r) -> str:
    """`done N steps, final loss …, eval loss a -> b, weights moved …` (a run that took no step has no loss)."""
    parts = [f"[green]done[/] {r.steps} steps"]
    if r.final_loss is not None:
        parts.append(f"final loss {r.final_loss:.4f}")
    if r.eval_loss is not None:
        parts.append(f"eval loss {r.initial_eval_loss:.4f} -> {r.eval_loss:.4f}" if r.initial_eval_loss is not None
                     else f"eval loss {r.eval_loss:.4f}")
    return ", ".join(parts) + f", weights moved {r.weight_change.get('overall', 0.0):.2e} (relative) -> {r.model_dir}"
