"""Shared fixtures: the real SmolLM2 tokenizer, tiny random-weight models built from a config, shared data paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# prepared data (data.cache) goes to one directory per test session, never the user's cache
if "SFTLAB_DATA_CACHE" not in os.environ:
    os.environ["SFTLAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="sftlab-test-data-cache-")
    atexit.register(shutil.rmtree, os.environ["SFTLAB_DATA_CACHE"], True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTLAB_SHARED", ROOT.parent / "shared")) / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data not found at {SHARED} (CI clones the repo with ../shared beside it)")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML chat template with a default system prompt)."""
    from sftlab.models import load_tokenizer

    return load_tokenizer("default")


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0, layers: int = 2, hidden: int = 64, **overrides):
    """A 2-layer random-weight Llama sized for unit tests (fp32, eager-comparable)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, **overrides)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A saved tiny model directory with the real tokenizer, loadable with --model DIR."""
    model = make_tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
