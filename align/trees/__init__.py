"""UltraInteract-style preference trees: the builder, its store and the export; the problems, verifiers and
critics they use are in align/tasks/, the model backends in align/evaluation/backends.py."""
