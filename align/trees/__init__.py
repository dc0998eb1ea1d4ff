"""UltraInteract-style preference trees: problems, verifiers, sandbox, model backends, builder, store, export."""
