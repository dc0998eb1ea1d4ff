"""Pushing folders (adapters, merged models, datasets) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from align.train.data import local_form
from align.core.errors import AlignError
from align.core.hub import hub_call


# What a stage's output folder holds that is not the model: checkpoints (optimizer and RNG states), logs, a
# merged copy (publish it on its own, with align publish --merge).
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", "merged/**", "*.tmp", ".*"]


def check_push_folder(folder: str, repo_type: str = "model") -> None:
    """What a push of `folder` would upload (without PUSH_IGNORE) holds no secret: not the value of one of
    this environment's (or this process's) secrets, and, for a model, nothing that looks like a credential
    of any kind (align.core.leaks.credential_in_file): one line naming the file, else nothing."""
    from align.core.leaks import check_folder

    check_folder(folder, ignore=PUSH_IGNORE, patterns=repo_type == "model")


def push_folder(folder: str, repo_id: str, repo_type: str = "model", private: bool = True,
                token: str | None = None) -> str:
    """Create `repo_id` (private by default) and upload `folder` (without PUSH_IGNORE), once
    check_push_folder finds no secret in it; the token is `token` (a recipe's hub_token, held in memory),
    else HF_TOKEN / the login."""
    from huggingface_hub import HfApi

    if "/" not in repo_id:
        raise AlignError(f"--push-to-hub/--repo-id: {repo_id!r} should look like ORG/NAME")
    check_push_folder(folder, repo_type)
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    hub_call(f"push to {repo_id}", api.create_repo, repo_id, repo_type=repo_type, private=private, exist_ok=True)
    hub_call(f"push to {repo_id}", api.upload_folder, folder_path=folder, repo_id=repo_id, repo_type=repo_type,
             ignore_patterns=PUSH_IGNORE)
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def is_local(name: str | None) -> bool:
    """A folder on this machine (a stage's output), not a Hub repo id."""
    return bool(name) and (Path(name).expanduser().exists() or local_form(str(name)))


CARD_LICENSE = "apache-2.0"


def _lora_groups(adapter_config: dict) -> list[str]:
    groups = []
    if adapter_config.get("target_modules"):
        groups.append("attention (" + ", ".join(sorted(adapter_config["target_modules"])) + ")")
    params = adapter_config.get("target_parameters") or []
    # PEFT names a target by a suffix of its full name (`gate_up_proj`, `mlp.experts.down_proj`, `gate.weight`)
    experts = [p for p in params if p.split(".")[-1] in ("gate_up_proj", "down_proj") or "experts" in p.split(".")]
    router = [p for p in params if p not in experts and (p.endswith("gate.weight") or p.split(".")[-1] in ("gate", "router"))]
    if experts:
        groups.append("experts (" + ", ".join(experts) + ")")
    if router:
        groups.append("router (" + ", ".join(router) + ")")
    return groups


def _eval_results(problems, r: dict) -> list:
    """model-index entries of one evaluated model: pass@1 per problem set (a standard set under its Hub
    repo), pass@k-turns and the sampled pass@k. Each set is named as the eval's tables name it
    (align.evaluation.evaluate.set_labels): no local path, a set read from a local mirror (`mbpp@/data/mbpp.parquet`)
    by the set, a problems file by its file name (and parent folders where two share a name)."""
    from huggingface_hub import EvalResult

    from align.evaluation.evaluate import set_labels
    from align.tasks.hub_sets import HUB_SETS, parse_spec

    names = [problems] if isinstance(problems, str) else [str(p) for p in problems]
    single = set_labels(names[:1])[names[0]]

    def dataset(label: str) -> tuple[str, str]:
        hub = parse_spec(label) if label != "humaneval" else ("humaneval", None, None)
        if hub is not None:
            return HUB_SETS[hub[0]].repo, label
        return label.split(":")[0], label

    def entry(name: str, metric: str, value: float):
        dataset_type, dataset_name = dataset(name)
        return EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
                          metric_type=metric, metric_value=value)

    if r.get("per_set"):  # several sets: each under its own name
        out = [entry(s, "pass@1", v["pass@1"]) for s, v in r["per_set"].items()]
        out += [entry(s, f"{k} (sampled)", v) for s, ks in r.get("sampled", {}).get("per_set", {}).items()
                for k, v in ks.items()]
        return out  # (pass@k-turns is over the sets together: not one dataset's figure)
    out = [entry(single, "pass@1", r["pass@1"])]
    out += [entry(single, f"pass@{k}-turns", v) for k, v in r.get("pass@turns", {}).items() if k != "1"]
    out += [entry(single, f"{k} (sampled)", v) for k, v in r.get("sampled", {}).items() if k.startswith("pass@")]
    return out


def model_card(stage_dir: Path, config: dict, adapter_config: dict | None, merged: bool, repo_id: str,
               eval_results: dict | None, plots: list[str], base_repo: str | None = None,
               dataset_repos: list[str] | None = None):
    """huggingface_hub's ModelCard with its card data: base_model, datasets (Hub repo ids only: a local
    folder is named in the text, never in the metadata), tags, license, library_name, pipeline_tag, and
    model-index results from the eval stage."""
    from huggingface_hub import ModelCard, ModelCardData

    from align.evaluation.evaluate import markdown_table

    model_cfg, data_cfg, train_cfg = config.get("model", {}), config.get("data", {}), config.get("training", {})
    base = model_cfg.get("model_name_or_path") or "unknown"
    base_repo = base_repo or (None if is_local(base) or base.startswith("tiny-mixtral") else base)
    datasets = [d["path"] if isinstance(d, dict) else str(d) for d in data_cfg.get("datasets", [])]
    dataset_repos = dataset_repos if dataset_repos is not None else [d for d in datasets if not is_local(d)]
    stage = config.get("stage", "sft")
    results = []
    for name, r in (eval_results or {}).get("models", {}).items():
        if r.get("adapter") and Path(r["adapter"]).resolve() == Path(stage_dir).resolve():
            results += _eval_results(eval_results.get("problems", "eval"), r)
    data = ModelCardData(
        base_model=base_repo, datasets=dataset_repos or None, library_name="transformers" if merged or not adapter_config else "peft",
        license=CARD_LICENSE, tags=["moe", "mixtral", "lora", stage, "align", "preference-trees"],
        pipeline_tag="text-generation", model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None)
    lora = _lora_groups(adapter_config or {})
    settings = {k: train_cfg.get(k) for k in ("learning_rate", "num_train_epochs", "max_steps", "beta", "loss_type",
                                               "per_device_train_batch_size", "gradient_accumulation_steps",
                                               "router_aux_loss_coef") if train_cfg.get(k) not in (None, [], -1)}
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"`{base}` tuned with **{stage.upper()}** by moe-align"
             + (" (adapter merged into the base)." if merged else " (a PEFT LoRA adapter)."), "",
             "## Training", "",
             f"- base model: `{base}`" + (f" (on the Hub: `{base_repo}`)" if base_repo and base_repo != base else ""),
             f"- datasets: {', '.join(f'`{d}`' for d in datasets) or 'n/a'}",
             f"- LoRA targets: {'; '.join(lora) if lora else 'none (full-parameter)'}"
             + (f"; rank {adapter_config.get('r')}, alpha {adapter_config.get('lora_alpha')}" if adapter_config else ""),
             "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
             "- recipe: the fully resolved configuration is in `align_config.yaml`", ""]
    if eval_results:
        lines += ["## Evaluation", "", "pass@1 with greedy decoding (and, where the eval ran them, pass@k over "
                  "feedback turns and sampled pass@k)", "", markdown_table(eval_results).strip(), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    lines += ["## Intended use and limitations", "",
              "Research on preference tuning of Mixture-of-Experts models for reasoning. The model was tuned on "
              "verifiable problems (math answers, unit tests, exact-match logic); it has not been evaluated for "
              "safety, factuality or use outside those tasks, and inherits the base model's limitations.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def build_publish_folder(stage_dir: str, repo_id: str, output: str, merge: bool = False,
                         eval_results: str | None = None, base_repo: str | None = None,
                         dataset_repos: list[str] | None = None) -> Path:
    import json
    import shutil

    import yaml

    src, out = Path(stage_dir), Path(output)
    if not (src / "align_config.yaml").is_file():
        raise AlignError(f"{stage_dir}: not a stage output (no align_config.yaml)")
    from align.core.leaks import mask

    # masked again: a folder a stage wrote before align masked its config would publish its credentials
    config, unmasked = mask(yaml.safe_load((src / "align_config.yaml").read_text()))
    adapter_config = json.loads((src / "adapter_config.json").read_text()) if (src / "adapter_config.json").exists() else None
    if merge and adapter_config:  # the base and the adapter are what they say, before the output is touched
        from align.train.model_check import check_adapter, check_model

        base = adapter_config.get("base_model_name_or_path")
        if not base:
            raise AlignError(f"{src / 'adapter_config.json'}: no base_model_name_or_path to merge the adapter into")
        check_adapter(str(src), check_model(base, "base_model_name_or_path", str(src / "adapter_config.json"),
                                            tokenizer=False), "--merge", str(src))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if merge and adapter_config:
        from align.train.models import load_for_generation

        # merged in the dtype the stage trained in (the recipe's; "auto": the checkpoint's own), not float32
        dtype = (config.get("model") or {}).get("dtype") or "auto"
        model = load_for_generation(adapter_config["base_model_name_or_path"], str(src), dtype=dtype)
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # (a 4-bit base comes unmerged)
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
    if unmasked:
        (out / "align_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    results, plots = None, []
    if eval_results and Path(eval_results).is_file():
        results = json.loads(Path(eval_results).read_text())
        plot_dir = Path(eval_results).parent / "plots"
        if plot_dir.is_dir():
            (out / "plots").mkdir()
            for png in sorted(plot_dir.glob("*.png")):
                shutil.copy2(png, out / "plots" / png.name)
                plots.append(png.name)
    model_card(src, config, adapter_config, merge and bool(adapter_config), repo_id, results, plots, base_repo,
               dataset_repos).save(str(out / "README.md"))
    return out


def main(argv: list[str]):
    from align.core.errors import ArgumentParser

    parser = ArgumentParser(prog="align publish")
    parser.add_argument("stage_output", help="a stage's output folder (adapter or full model)")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--merge", action="store_true", help="publish the base with the adapter merged in")
    parser.add_argument("--dry-run", action="store_true", help="build the folder and card, push nothing")
    parser.add_argument("--output", help="where to build the Hub folder (default: STAGE_OUTPUT/hub)")
    parser.add_argument("--eval", help="an eval results.json whose table and plots go into the card")
    parser.add_argument("--public", action="store_true", help="create the repo public (default private)")
    parser.add_argument("--base-repo-id", help="the Hub repo of the base model, when the stage trained on a local folder")
    parser.add_argument("--dataset-repo-id", action="append", help="a Hub dataset repo of the training data (repeatable), "
                        "when the stage trained on local folders")
    args = parser.parse_args(argv)
    for flag, value in (("--repo-id", args.repo_id), ("--base-repo-id", args.base_repo_id),
                        *(("--dataset-repo-id", d) for d in args.dataset_repo_id or [])):
        if value is not None and ("/" not in value or is_local(value)):
            raise AlignError(f"{flag}: {value!r} should be a Hub repo id, ORG/NAME")
    folder = build_publish_folder(args.stage_output, args.repo_id, args.output or os.path.join(args.stage_output, "hub"),
                                  merge=args.merge, eval_results=args.eval, base_repo=args.base_repo_id,
                                  dataset_repos=args.dataset_repo_id)
    check_push_folder(str(folder))  # a dry run refuses as the push would: one line naming the file
    print(f"[align] publish: folder ready at {folder}")
    if not args.dry_run:
        from huggingface_hub import ModelCard

        card = ModelCard.load(str(folder / "README.md"))
        config = __import__("yaml").safe_load((Path(args.stage_output) / "align_config.yaml").read_text())
        base = (config.get("model") or {}).get("model_name_or_path")
        if not card.data.base_model:  # the card names Hub repos only: a local base needs its repo named
            raise AlignError(f"--base-repo-id: the base model {base} is a local folder; push it (for instance with "
                             "align publish --merge) and name its repo with --base-repo-id")
        url = push_folder(str(folder), args.repo_id, private=not args.public)
        print(f"[align] publish: pushed to {url}")
    return 0
