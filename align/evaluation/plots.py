"""PNG plots of a pipeline: preference rewards over steps, expert load over training, tree statistics."""

from __future__ import annotations

import json
from pathlib import Path


def _history(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "trainer_state.json"
    return json.loads(path.read_text())["log_history"] if path.exists() else []


def make_plots(runs: dict[str, str], trees_dir: str | None, out: Path) -> list[str]:
    """runs: {name: stage output folder}. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    preference = {n: h for n, h in ((n, _history(d)) for n, d in runs.items()) if any("rewards/chosen" in x for x in h)}
    if preference:
        fig, axes = plt.subplots(1, len(preference) + 1, figsize=(4.5 * (len(preference) + 1), 3.6), squeeze=False)
        for ax, (name, hist) in zip(axes[0], preference.items()):
            rows = [h for h in hist if "rewards/chosen" in h]
            steps = [h["step"] for h in rows]
            for key, label in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin")):
                ax.plot(steps, [h.get(key, float("nan")) for h in rows], label=label)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{name}: implicit rewards")
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        ax = axes[0][-1]
        for name, hist in preference.items():
            rows = [h for h in hist if "rewards/chosen" in h]
            ax.plot([h["step"] for h in rows], [h["rewards/chosen"] for h in rows], label=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title("chosen reward by objective")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "rewards.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    for name, run_dir in runs.items():
        rows = [h for h in _history(run_dir) if any(k.startswith("router/layer_") for k in h)]
        if not rows:
            continue
        layers = sorted({int(k.split("/")[1].split("_")[1]) for k in rows[0] if k.startswith("router/layer_")})
        fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            experts = sorted(int(k.rsplit("_", 1)[1]) for k in rows[0] if k.startswith(f"router/layer_{layer}/expert_"))
            for e in experts:
                ax.plot([h["step"] for h in rows], [h.get(f"router/layer_{layer}/expert_{e}") for h in rows], label=f"e{e}")
            ax.set_title(f"{name}: layer {layer} expert load")
            ax.set_ylim(0, 1)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"expert_load_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    if trees_dir and (Path(trees_dir) / "trees.jsonl").exists():
        from align.trees.export import load_trees, tree_stats

        stats = tree_stats(load_trees(trees_dir))
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
        turns = stats["trajectories_by_turns"]
        a.bar([str(k) for k in turns], list(turns.values()))
        a.set_title("trees by number of turns")
        a.set_xlabel("turns")
        rates = stats["pass_rate_per_turn"]
        b.plot([int(k) for k in rates], list(rates.values()), marker="o")
        b.set_ylim(0, 1)
        b.set_title("pass rate per turn")
        b.set_xlabel("turn")
        fig.tight_layout()
        path = out / "trees.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
