"""Training: recipes (config), data, the models and their checks, chat templates, checkpoints, preflight,
accelerate launching and the shared stage runner that align/sft, align/dpo and align/kto_nca call."""
