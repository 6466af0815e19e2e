"""HTML report of runs: audit, training curves, evaluation, forgetting (`sftlab report`)."""
