"""Foundations: errors, the environment guard and logging, redaction and the leak checks, progress, Hub calls,
process lifecycle, the embedded tiny models. Imports nothing of align outside align.core."""
