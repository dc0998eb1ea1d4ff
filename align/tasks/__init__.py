"""The tasks: problems (built-in, files, standard Hub sets), their verifiers and sandbox, and the critics'
feedback turns. The trees (align/trees/) and eval (align/evaluation/evaluate.py) both build on them."""
