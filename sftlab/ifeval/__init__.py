"""IFEval (Zhou et al. 2023, arXiv:2311.07911): does a model follow verifiable instructions ("no commas", "at
least 300 words", "answer in JSON")? Prompts -> greedy responses -> lm-eval's checkers, strict and loose.

- `score`: `load_prompts`, `score` (per-prompt rows and the figures), `compare` (tuned minus base, bootstrap CIs);
- `responses`: `generate_responses` with a model, the upstream responses file format, `score_file`;
- `checkers`: the 25 instruction checkers (lm-eval, imported) and the strict/loose rule of the original code;
(the `sftlab ifeval score` command is in sftlab/cli/ifeval.py)
Nothing is imported here, so `sftlab --help` does not pay for generation or lm-eval.
"""
