"""smear pipeline: merging, counts, flags, reports, evaluation and the CLI."""
