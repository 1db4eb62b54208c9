"""What a run reports: results.json, summary.md, plots, the console, MLflow; comparing runs."""
