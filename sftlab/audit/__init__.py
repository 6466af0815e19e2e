"""Knowledge audit: per example and per task, how much of each response the base model already holds.

The definitions (s_cond, s_uncond, IFD, few-shot baseline, greedy answers), the verdict rules and the
schema of every output file are in docs/audit.md. One module per job, each importable alone:

- `items`: the examples to audit (the data chain with the audit's tokenize options, a per-task sample,
  few-shot prompts);
- `scoring`: the forward passes (`ScoreJob`s cut into `ScoreChunk`s, scored by `sftlab.lm.response_nll`)
  and greedy answers, into one row per example;
- `verdicts`: pure statistics and verdicts over rows (what `select` and reports need);
- `store`: the audit directory: the settings fingerprint, the partial files a rerun resumes from, the final files;
- `command`: `run_audit`, the orchestration behind `sftlab audit` and the run's audit stage, and its table.
"""
