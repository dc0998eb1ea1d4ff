"""The pipeline runner: `align run` and the quickstart's data generators."""
