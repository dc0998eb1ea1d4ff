"""Pushing folders (adapters, merged models, datasets) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from align.errors import AlignError


def push_folder(folder: str, repo_id: str, repo_type: str = "model", private: bool = True) -> str:
    """Create `repo_id` (private by default) and upload `folder`; the token comes from HF_TOKEN / the login."""
    from huggingface_hub import HfApi

    if "/" not in repo_id:
        raise AlignError(f"--push-to-hub/--repo-id: {repo_id!r} should look like ORG/NAME")
    from align.leaks import check_folder

    check_folder(folder)
    api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type)
    except Exception as err:  # network, auth: the user needs the reason, not a traceback
        raise AlignError(f"push to {repo_id} failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


CARD_LICENSE = "apache-2.0"


def _lora_groups(adapter_config: dict) -> list[str]:
    groups = []
    if adapter_config.get("target_modules"):
        groups.append("attention (" + ", ".join(sorted(adapter_config["target_modules"])) + ")")
    params = adapter_config.get("target_parameters") or []
    if any("experts" in p for p in params):
        groups.append("experts (" + ", ".join(p for p in params if "experts" in p) + ")")
    if any(p.startswith("gate") or ".gate." in p for p in params):
        groups.append("router (gate.weight)")
    return groups


def model_card(stage_dir: Path, config: dict, adapter_config: dict | None, merged: bool, repo_id: str,
               eval_table: str | None, plots: list[str]) -> str:
    """A model card whose YAML block carries base_model, datasets, tags, license and library_name."""
    model_cfg, data_cfg, train_cfg = config.get("model", {}), config.get("data", {}), config.get("training", {})
    base = model_cfg.get("model_name_or_path") or "unknown"
    datasets = [d["path"] if isinstance(d, dict) else str(d) for d in data_cfg.get("datasets", [])]
    stage = config.get("stage", "sft")
    meta = {
        "base_model": base,
        "datasets": datasets,
        "library_name": "transformers" if merged or not adapter_config else "peft",
        "license": CARD_LICENSE,
        "tags": ["moe", "mixtral", "lora", stage, "align", "preference-trees"],
        "pipeline_tag": "text-generation",
    }
    import yaml

    lora = _lora_groups(adapter_config or {})
    settings = {k: train_cfg.get(k) for k in ("learning_rate", "num_train_epochs", "max_steps", "beta", "loss_type",
                                               "per_device_train_batch_size", "gradient_accumulation_steps",
                                               "router_aux_loss_coef") if train_cfg.get(k) not in (None, [], -1)}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"`{base}` tuned with **{stage.upper()}** by moe-align"
             + (" (adapter merged into the base)." if merged else " (a PEFT LoRA adapter)."), "",
             "## Training", "",
             f"- base model: `{base}`",
             f"- datasets: {', '.join(f'`{d}`' for d in datasets) or 'n/a'}",
             f"- LoRA targets: {'; '.join(lora) if lora else 'none (full-parameter)'}"
             + (f"; rank {adapter_config.get('r')}, alpha {adapter_config.get('lora_alpha')}" if adapter_config else ""),
             "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
             "- recipe: the fully resolved configuration is in `align_config.yaml`", ""]
    if eval_table:
        lines += ["## Evaluation (pass@1, greedy)", "", eval_table.strip(), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    lines += ["## Intended use and limitations", "",
              "Research on preference tuning of Mixture-of-Experts models for reasoning. The model was tuned on "
              "verifiable problems (math answers, unit tests, exact-match logic); it has not been evaluated for "
              "safety, factuality or use outside those tasks, and inherits the base model's limitations.", ""]
    return "\n".join(lines)


def build_publish_folder(stage_dir: str, repo_id: str, output: str, merge: bool = False,
                         eval_results: str | None = None) -> Path:
    import json
    import shutil

    import yaml

    src, out = Path(stage_dir), Path(output)
    if not (src / "align_config.yaml").is_file():
        raise AlignError(f"{stage_dir}: not a stage output (no align_config.yaml)")
    config = yaml.safe_load((src / "align_config.yaml").read_text())
    adapter_config = json.loads((src / "adapter_config.json").read_text()) if (src / "adapter_config.json").exists() else None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if merge and adapter_config:
        from align.models import load_for_generation

        # merged in the dtype the stage trained in (the recipe's; "auto": the checkpoint's own), not float32
        dtype = (config.get("model") or {}).get("dtype") or "auto"
        model = load_for_generation(adapter_config["base_model_name_or_path"], str(src), dtype=dtype).merge_and_unload()
        model.save_pretrained(out)
    else:
        for item in src.iterdir():
            if item.is_file() and (item.name.startswith(("adapter_", "model", "config", "generation_config"))
                                   or item.suffix == ".safetensors"):
                shutil.copy2(item, out / item.name)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "chat_template.jinja", "align_config.yaml"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    eval_table, plots = None, []
    if eval_results and Path(eval_results).is_file():
        from align.evaluate import markdown_table

        eval_table = markdown_table(json.loads(Path(eval_results).read_text()))
        plot_dir = Path(eval_results).parent / "plots"
        if plot_dir.is_dir():
            (out / "plots").mkdir()
            for png in sorted(plot_dir.glob("*.png")):
                shutil.copy2(png, out / "plots" / png.name)
                plots.append(png.name)
    (out / "README.md").write_text(model_card(src, config, adapter_config, merge and bool(adapter_config), repo_id,
                                              eval_table, plots))
    return out


def main(argv: list[str]):
    from align.errors import ArgumentParser

    parser = ArgumentParser(prog="align publish")
    parser.add_argument("stage_output", help="a stage's output folder (adapter or full model)")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--merge", action="store_true", help="publish the base with the adapter merged in")
    parser.add_argument("--dry-run", action="store_true", help="build the folder and card, push nothing")
    parser.add_argument("--output", help="where to build the Hub folder (default: STAGE_OUTPUT/hub)")
    parser.add_argument("--eval", help="an eval results.json whose table and plots go into the card")
    parser.add_argument("--public", action="store_true", help="create the repo public (default private)")
    args = parser.parse_args(argv)
    if "/" not in args.repo_id:
        raise AlignError(f"--repo-id: {args.repo_id!r} should look like ORG/NAME")
    folder = build_publish_folder(args.stage_output, args.repo_id, args.output or os.path.join(args.stage_output, "hub"),
                                  merge=args.merge, eval_results=args.eval)
    print(f"[align] publish: folder ready at {folder}")
    if not args.dry_run:
        url = push_folder(str(folder), args.repo_id, private=not args.public)
        print(f"[align] publish: pushed to {url}")
    return 0
