"""Evaluation: `align eval`, its plots, and the generation backends (local, server) that eval and the
trees share."""
