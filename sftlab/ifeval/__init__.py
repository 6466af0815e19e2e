"""IFEval (Zhou et al. 2023, arXiv:2311.07911): does a model follow verifiable instructions ("no commas", "at
least 300 words", "answer in JSON")? Prompts -> greedy responses -> lm-eval's checkers, strict and loose.

- `checkers`: the 25 instruction checkers (lm-eval, imported) and the strict/loose rule of the original code;
- `score`: `load_prompts`, `score` (per-prompt rows and the figures), `compare` (tuned minus base, bootstrap CIs);
- `responses`: `generate_responses` with a model, the upstream responses file format, `score_file`.
"""

from .responses import generate_responses, read_responses, score_file, write_responses
from .score import (FIGURES, IFEvalPrompt, compare, figures, load_prompts, match_responses, score, score_rows,
                    summary_lines)

__all__ = ["FIGURES", "IFEvalPrompt", "compare", "figures", "generate_responses", "load_prompts", "match_responses",
           "read_responses", "score", "score_file", "score_rows", "summary_lines", "write_responses"]
