"""smear pipeline: merging, counts, indicators, reports, evaluation and the CLI."""
