"""One typed training config: YAML file + dotted `key=value` overrides, validated by pydantic.

Every field has a default and a one-line description; the same names are used in YAML, on the command
line (`train.lr=1e-5`) and in the docs (`sftlab train --help-config` prints them all).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# keys that were renamed (section.key): the old name is an error that names the new one, in YAML, overrides and
# the Python API alike
RENAMED = {"data.eval": "data.validation", "data.eval_fraction": "data.validation_fraction",
           "audit.batch_tokens": "audit.forward_batch_tokens", "eval.batch_tokens": "eval.forward_batch_tokens"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    section: ClassVar[str] = ""  # the section's name in a config file (for RENAMED)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        if isinstance(data, dict):
            old = [f"'{k}' was renamed to '{v}'" for k, v in RENAMED.items()
                   if k.rpartition(".")[0] == cls.section and k.rpartition(".")[2] in data]
            if old:
                raise ValueError("; ".join(old))
        return data


class ModelConfig(Strict):
    path: str = Field("default", description="HF model dir, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="Weight dtype when loading (bf16 autocast: train.precision)")
    attn_implementation: str | None = Field(
        "auto", description="auto (training on CPU: segments, else sdpa) | segments (causal attention per example, "
        "sftlab/attention.py) | sdpa | eager | flash_attention_2 | flex_attention")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory")


class LoraConfig(Strict):
    enabled: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights")
    r: int = Field(16, description="LoRA rank")
    alpha: float = Field(32, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, description="Dropout on the LoRA input")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt ('all-linear' or names)")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA)")


DataFormat = Literal["alpaca", "prompt_completion", "messages", "sharegpt"]


class DataConfig(Strict):
    section: ClassVar[str] = "data"
    train: list[str] = Field(default_factory=list, description="Training data: files, directories, globs, saved datasets")
    validation: list[str] = Field(default_factory=list, description="Validation-loss data (if empty, "
                                  "validation_fraction of train)")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="Share of train held out for the validation "
                                       "loss when validation is empty")
    format: DataFormat | None = Field(
        None, description="alpaca | prompt_completion | messages | sharegpt (None: detect per file)")
    template: str = Field("default", description="'default' (tokenizer's), chatml, alpaca, or a .jinja path")
    task_map: str | None = Field(None, description="JSON map file stem -> task (or -> {task, cluster})")
    task_field: str | None = Field(None, description="Record field with the task label")
    strip: list[str] = Field(default_factory=list, description="Trailing text removed from responses")
    max_length: int | None = Field(1024, ge=2, description="Maximum tokens per example (None: no limit)")
    truncation: Literal["truncate-prompt-left", "drop"] = Field("truncate-prompt-left", description="Over-long policy")
    loss_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description="Which tokens are trained")
    prompt_loss_weight: float = Field(0.0, ge=0, le=1, description="Loss weight of non-response tokens")
    skip_invalid: bool = Field(False, description="Skip invalid records (counted) instead of failing")
    dedup: bool = Field(False, description="Drop exact duplicate conversations")
    train_reasoning: bool = Field(True, description="Train assistants' reasoning traces (false: keep them as "
                                  "context, train what follows them)")
    tools: str | None = Field(None, description="JSON file with a list of tool schemas for records without "
                              "their own 'tools'")
    cache: bool = Field(True, description="Tokenize once: training reads the examples from a cache entry keyed by "
                        "the inputs' content, tokenizer, template and these options (sftlab/data/prepared.py)")
    cache_dir: str | None = Field(None, description="Where prepared data is cached (None: $SFTLAB_DATA_CACHE, else "
                                  "~/.cache/sftlab/data)")
    num_workers: int = Field(1, ge=1, description="Processes that render and tokenize while data is prepared")

    @model_validator(mode="after")
    def _task_source(self):
        if self.task_map and self.task_field:
            raise ValueError("give either task_map or task_field, not both (the task label comes from one)")
        return self


class ReplayConfig(Strict):
    data: list[str] = Field(description="General data mixed into every micro-batch: files, directories, globs "
                            "(read with the data.* template and options)")
    ratio: float = Field(0.1, ge=0, lt=1, description="Share of each micro-batch's examples drawn from the replay "
                         "pool (packed: share of each epoch's examples)")
    format: str | None = Field(None, description="Format of the replay files (None: detect per file)")
    task: str = Field("replay", description="Task label of replay examples (kept out of summary.json tasks)")
    limit: int | None = Field(None, ge=1, description="Keep a seeded uniform sample of N replay examples")

    @field_validator("data")
    @classmethod
    def _data(cls, v):
        if not v:
            raise ValueError("no replay data: give general-data files (train.replay.data=[path, ...]) "
                             "or turn replay off (train.replay=null)")
        return v


class TrainConfig(Strict):
    epochs: float = Field(1, gt=0, description="Passes over the training data (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs)")
    batching: Literal["length_grouped", "packed"] = Field(
        "length_grouped", description="Padded length-grouped micro-batches, or best-fit packed rows")
    batch_tokens: int | None = Field(4096, ge=1, description="Tokens per micro-batch (padded size or packed row "
                                     "length; packed and None: data.max_length)")
    batch_size: int | None = Field(None, ge=1, description="Examples per micro-batch, instead of batch_tokens "
                                   "(length_grouped only)")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per process per optimizer step")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps for linear warm-up")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping (None: off)")
    precision: Literal["fp32", "bf16", "bf16-master"] = Field(
        "fp32", description="fp32; bf16: autocast over fp32 weights; bf16-master: bf16 weights and activations, fp32 "
        "master weights and AdamW state (fastest; docs/training.md)")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward")
    loss_chunk_size: int = Field(1024, ge=1, description="Trained positions per chunk of the LM-head loss")
    seed: int = Field(0, description="Seed for data order, init and dropout")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (None: at the end only)")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N validations without "
                                                "improvement (needs eval_every)")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (None: at the end only)")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard package)")
    fused_adamw: bool | None = Field(None, description="Fused AdamW (None: where available)")
    compile: bool = Field(False, description="torch.compile the model")
    fsdp: bool = Field(False, description="Shard parameters, gradients and optimizer state over the processes with "
                       "PyTorch FSDP2 (fully_shard per decoder layer; launch with torchrun or accelerate launch, "
                       "a multi-process non-FSDP config); precision fp32 or bf16")
    malloc_tuning: bool = Field(True, description="glibc: keep freed memory for reuse instead of returning it to the "
                                "OS after every op (faster CPU steps; sftlab/train/runtime.py)")
    # forgetting mitigations (docs/training.md, "Mitigations")
    replay: ReplayConfig | None = Field(None, description="Mix general data into training: {data: [paths], ratio: "
                                        "0.1, format, task, limit} (None: off)")
    objective: Literal["nll", "dft", "eaft"] = Field(
        "nll", description="Per-token weighting of the NLL (detached; normaliser: trained tokens): nll (plain SFT), "
        "dft (the token's own probability, arXiv 2508.05629; with kl_to_base: ASFT), eaft (normalised top-k "
        "entropy ** eaft_alpha, arXiv 2601.02151)")
    eaft_top_k: int = Field(20, ge=2, description="EAFT: logits whose softmax entropy weights a token (k)")
    eaft_alpha: float = Field(1.0, gt=0, description="EAFT: exponent of the normalised entropy")
    kl_to_base: float = Field(0.0, ge=0, description="λ of λ·KL(p_tuned || p_base) per trained token (0: off)")
    drift_examples: int = Field(0, ge=0, description="Forgetting proxy: KL(p_base || p_tuned) per token on N validation "
                                "examples (else N training examples) and N questions of drift_general, logged at "
                                "the start, every eval_every steps and the end (0: off)")
    drift_general: list[str] = Field(default_factory=list, description="QA files (eval.question_field / "
                                     "answer_field) whose gold-answer replies the forgetting proxy also scores")
    l2_to_base: float = Field(0.0, ge=0, description="λ of the L2-SP penalty λ·||θ-θ0||² on trainable params (0: off)")

    @model_validator(mode="before")
    @classmethod
    def _batch_size_replaces_batch_tokens(cls, data):
        """batch_size and batch_tokens size a micro-batch two ways: giving batch_size switches batch_tokens off;
        giving both is an error (the default batch_tokens applies only when batch_size is not given)."""
        if isinstance(data, dict) and data.get("batch_size") is not None:
            if data.get("batch_tokens") is not None:
                raise ValueError("give either train.batch_size or train.batch_tokens, not both")
            data = {**data, "batch_tokens": None}
        return data

    @model_validator(mode="after")
    def _interactions(self):
        if self.batching == "packed" and self.batch_size is not None:
            raise ValueError("train.batching=packed sizes its rows by train.batch_tokens; train.batch_size is for "
                             "length_grouped batching")
        if self.batching == "length_grouped" and self.batch_size is None and self.batch_tokens is None:
            raise ValueError("length_grouped batching needs train.batch_tokens or train.batch_size")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every (validations to compare)")
        return self


# ---- sftlab run: the stages around training (`sftlab train` ignores these sections) ----------------------------
class AuditConfig(Strict):
    section: ClassVar[str] = "audit"
    enabled: bool = Field(True, description="sftlab run: audit data.train with the base model first (RUN/audit)")
    few_shot: int = Field(0, ge=0, description="K solved examples of the same task before the prompt (0: off)")
    few_shot_per_task: int = Field(50, ge=0, description="Examples per task that get the few-shot baseline")
    generate: bool = Field(False, description="Greedy answers with normalised exact match and ROUGE-L")
    max_new_tokens: int = Field(64, ge=1, description="Cap on generated tokens (also n_response_tokens + 16)")
    limit_per_task: int | None = Field(None, ge=1, description="Audit a seeded uniform sample of N examples per task")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32 (exact) | bf16 (bf16 weights, as training's bf16 "
                                           "path; cross-entropy in fp32; docs/audit.md for the tolerance)")
    forward_batch_tokens: int = Field(8192, ge=1, description="Padded tokens per forward pass (and generation batch)")
    max_batch_size: int = Field(64, ge=1, description="Sequences per forward pass at most")
    chunk_examples: int = Field(128, ge=1, description="Examples scored and saved together (the unit of resuming)")
    seed: int = Field(0, description="Seed of the per-task sample and the choice of shots")
    known_match: float = Field(0.5, ge=0, le=1, description="Verdict 'known' at greedy exact match >= this")
    known_nll: float = Field(0.5, ge=0, description="Verdict 'known' at median s_cond <= this (nats/token)")
    latent_ratio: float = Field(0.6, gt=0, description="Verdict 'latent' at median IFD or few-shot ratio <= this")



class SelectConfig(Strict):
    strategy: Literal["ifd-top", "drop-known", "task-balanced", "diverse", "self-rehearsal"] | None = Field(
        None, description="sftlab run: choose the training set from the audit (None: train on all of data.train)")
    budget: int | str | None = Field(None, description="Examples to keep: N or P% of the audited examples (None: all)")
    seed: int = Field(0, description="Seed for the random order within strategies")
    dup_threshold: float = Field(0.8, gt=0, le=1, description="diverse: MinHash Jaccard of near-duplicates")
    rehearsal_rouge: float | None = Field(None, gt=0, le=1, description="self-rehearsal: also train on the base "
                                          "model's answer where its ROUGE-L F to the gold is at least this "
                                          "(None: exact match only)")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        s = str(v).strip() if v is not None else None
        if s is not None and not (s.isdigit() and int(s) > 0
                                  or s.endswith("%") and s[:-1].replace(".", "", 1).isdigit()
                                  and 0 < float(s[:-1]) <= 100):
            raise ValueError(f"expected a number of examples (e.g. 500) or a percentage in (0, 100] (e.g. 10%), "
                             f"got {v!r}")
        return v

    @model_validator(mode="after")
    def _budget_needed(self):
        if self.strategy is not None and self.budget is None:
            raise ValueError("select.budget is required when select.strategy is set (e.g. select.budget=50%)")
        return self


class EvalConfig(Strict):
    """`sftlab eval` and the run's eval stage (`evaluate.evaluate.evaluate` takes this section)."""
    section: ClassVar[str] = "eval"

    data: list[str] = Field(default_factory=list, description="Task data to evaluate, model vs base (read with the "
                            "data options; repeatable); sftlab run skips eval when data, general and text are empty")
    general: list[str] = Field(default_factory=list, description="General-knowledge QA file(s) (forgetting probe)")
    text: list[str] = Field(default_factory=list, description="Plain-text file(s) for perplexity (.txt, or JSONL "
                            "with text_field)")
    base: str | None = Field(None, description="sftlab run: model compared with (None: model.path, the model before "
                             "training)")
    limit: int | None = Field(None, ge=1, description="Seeded random sample of N valid examples per file (file order "
                              "kept; text files: first N records)")
    general_limit: int | None = Field(None, ge=1, description="N questions per general file (None: limit)")
    question_field: str = Field("question", description="QA question field")
    answer_field: str = Field("answer", description="QA gold answer field (string or list)")
    choices_field: str = Field("choices", description="QA options field, where a record has one (a list of "
                               "strings holding a gold answer): choice_accuracy ranks the options by mean NLL, a "
                               "measure a change of answer style cannot move alone")
    qa_distractors: int = Field(3, ge=0, description="QA records without options: rank the first gold answer "
                                "among this many gold answers of other questions of the same form (a number for a "
                                "number, then the nearest length); 0: choice_accuracy only for records with options")
    qa_shots: int = Field(3, ge=0, description="QA probes: few_shot_exact_match / few_shot_contains under one fixed "
                          "prompt with this many of the probe's questions and gold answers as earlier turns (the "
                          "same for base and model, so the answer format is shown, not each model's habit); 0: off")
    qa_prompt: str = Field("{question}", description="User message for a QA probe, with {question}")
    few_shot: int = Field(0, ge=0, description="K: base with K shots vs tuned zero-shot on held-out tasks")
    generations: int = Field(5, ge=0, description="Side-by-side generations kept in metrics.json and the report")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget for task data")
    qa_max_new_tokens: int = Field(32, ge=1, description="Generation budget for QA probes")
    batch_size: int = Field(32, ge=1, description="Prompts decoding together (finished replies leave the batch, "
                            "waiting prompts join it)")
    forward_batch_tokens: int = Field(4096, ge=1, description="Padded tokens per NLL forward pass")
    max_labels: int = Field(20, ge=2, description="Most distinct references a task may have to be scored as a label "
                            "set (accuracy)")
    text_window: int = Field(1024, ge=2, description="Tokens per perplexity window of a text file")
    text_field: str = Field("text", description="Record field holding the document in JSONL/JSON text files")
    bootstrap: int = Field(1000, ge=1, description="Bootstrap resamples for the CIs")
    seed: int = Field(0, description="Seed for the samples, bootstrap and few-shot demonstrations")
    ifeval: bool = Field(False, description="Instruction following: greedy replies to IFEval's prompts, scored by "
                         "its checkers (prompt/instruction level, strict/loose), tuned vs base (docs/ifeval.md)")
    ifeval_inputs: str = Field("../shared/data/ifeval/input_data.jsonl", description="IFEval's input_data.jsonl "
                               "(the default is this project's shared copy beside the checkout; give your own path "
                               "elsewhere)")
    ifeval_limit: int | None = Field(None, ge=1, description="A seeded sample of N IFEval prompts (None: all 541)")
    ifeval_max_new_tokens: int = Field(1024, ge=1, description="Generation budget per IFEval reply (it asks for "
                                       "long answers)")



class RunConfig(Strict):
    output_dir: str = Field("runs/sft", description="sftlab train: where checkpoints, metrics and the final model go; "
                            "sftlab run: the run directory (RUN/audit, RUN/train, RUN/eval, RUN/report.html)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report: bool = Field(True, description="sftlab run: write RUN/report.html at the end")


class ConfigError(ValueError):
    pass




def _sub_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The config section behind a field's type (`Section` or `Section | None`), and whether it is optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    members = typing.get_args(annotation)
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    return (models[0], type(None) in members) if len(models) == 1 else (None, False)


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        sub, optional = _sub_model(f.annotation)
        if sub is not None:
            keys += ([f"{prefix}{name}"] if optional else []) + _all_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggest(key: str, schema: type[BaseModel]) -> str:
    keys = _all_keys(schema)
    last = key.split(".")[-1]
    close = [k for k in keys if k.split(".")[-1] == last]  # right name, wrong section
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        names = difflib.get_close_matches(last, [k.split(".")[-1] for k in keys], n=1, cutoff=0.5)
        close = [k for k in keys if names and k.split(".")[-1] == names[0]]
    return f"; did you mean '{close[0]}'?" if close else ""


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be key=value (e.g. train.lr=1e-5)")
        k, v = item.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[BaseModel] = RunConfig) -> BaseModel:
    """Read YAML (optional), apply dotted overrides, validate; unknown keys name the nearest valid key."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
    for k, v in parse_overrides(overrides or []):
        set_dotted(tree, k, v)
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'{_suggest(key, schema)}")
            else:
                lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
        where = f"{path}: " if path else ""
        raise ConfigError(where + "; ".join(lines)) from None


def config_help(schema: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field, for docs and `--help-config`."""
    rows = []
    for name, f in schema.model_fields.items():
        sub, optional = _sub_model(f.annotation)
        if sub is not None:
            if optional:  # an optional section (off by default): the section itself, then its keys
                rows.append((f"{prefix}{name}", repr(f.default), f.description or ""))
            rows += config_help(sub, f"{prefix}{name}.")
        else:
            default = f.default_factory() if f.default_factory else f.default
            rows.append((f"{prefix}{name}", "(required)" if f.is_required() else repr(default), f.description or ""))
    return rows


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
