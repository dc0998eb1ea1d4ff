"""`align trees build|export|stats|import`, `align verify`, `align sandbox run`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from align.core.errors import AlignError, ArgumentParser


def trees_main(argv: list[str]):
    parser = ArgumentParser(prog="align trees")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build trees from a recipe (reruns resume)")
    b.add_argument("--config", required=True)
    e = sub.add_parser("export", help="SFT / pairs / KTO datasets from trees")
    e.add_argument("trees", help="a trees folder (or trees.jsonl)")
    e.add_argument("--output", required=True)
    e.add_argument("--leaves-only", action="store_true", help="SFT on correct leaves without history (Eurus)")
    e.add_argument("--push-to-hub", metavar="REPO", help="also push to the Hub as a private dataset")
    s = sub.add_parser("stats", help="trees, pairs, correct actions per task; turns histogram; pass rate per turn")
    s.add_argument("trees")
    s.add_argument("--json", action="store_true")
    i = sub.add_parser("import", help="released UltraInteract_pair data back into trees")
    i.add_argument("path")
    i.add_argument("--output", required=True)
    args, overrides = parser.parse_known_args(argv)  # unknown --key value pairs override the build recipe
    if overrides and args.action != "build":
        raise AlignError(f"align trees {args.action}: unrecognized arguments: {' '.join(overrides)}")
    command = "align trees " + " ".join(shlex.quote(a) for a in argv)

    if args.action == "build":
        from align.train.config import load_recipe_file, parse_cli_overrides
        from align.trees.builder import build_trees, check_trees_models, failed_problems_line, parse_trees_config

        values = load_recipe_file(args.config)
        values.update(parse_cli_overrides(overrides))
        if "problems" not in values:  # no silent default build from a recipe that names nothing
            raise AlignError(f"{args.config}: key 'problems' is required (a trees recipe names its problems)")
        config, actor, critic, limits = parse_trees_config(values, args.config)
        check_trees_models(actor, critic, args.config)
        summary = build_trees(config, actor, critic, limits, command=command)
        print(json.dumps(summary), flush=True)
        line = failed_problems_line(summary)
        if line:  # after the summary: the last thing a build says is why it exits 1
            print(line, file=sys.stderr, flush=True)
        return 1 if summary["failed"] else 0
    if args.action == "export":
        from align.trees.export import export_trees

        counts = export_trees(args.trees, args.output, leaves_only=args.leaves_only, command=command)
        print(json.dumps(counts))
        _warn_if_nothing_correct(json.loads((Path(args.output) / "stats.json").read_text())["stats"],
                                 f"; {', '.join(counts['empty_configs'])} left out of the card's configs (folders "
                                 "kept, empty)" if counts["empty_configs"] else "")
        if args.push_to_hub:
            from align.trees.export import push_export

            print(f"[align] trees: pushed to {push_export(args.output, args.push_to_hub)}")
        return 0
    if args.action == "stats":
        from align.trees.export import format_stats, load_trees, tree_stats

        stats = tree_stats(load_trees(args.trees))
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
        _warn_if_nothing_correct(stats)
        return 0
    from align.trees.export import import_released

    print(json.dumps({"trees_written": import_released(args.path, args.output)}))
    return 0


def _warn_if_nothing_correct(stats: dict, more: str = "") -> None:
    """One loud line on stderr (stdout stays the JSON / the table) when no action of the trees was correct."""
    from align.trees.export import no_correct_answer_warning

    warning = no_correct_answer_warning(stats)
    if warning:
        print(f"align: trees: {warning}{more}", file=sys.stderr, flush=True)


def _limits(where: str, **values):
    from align.tasks.sandbox import SandboxLimits

    try:
        return SandboxLimits(**values)
    except ValueError as err:
        raise AlignError(str(err).replace("sandbox: ", f"{where}: --").replace("timeout_s", "timeout")
                         .replace("memory_mb", "memory-mb")) from None


def verify_main(argv: list[str]):
    """One JSON verdict per response row, then `N passed, M failed`."""
    parser = ArgumentParser(prog="align verify")
    parser.add_argument("--problems", required=True, help="problems (dataset path or humaneval / arithmetic:N:SEED)")
    parser.add_argument("--responses", required=True, help="jsonl rows with problem_id (or id) and response")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per code run (default 10)")
    args = parser.parse_args(argv)
    limits = _limits("align verify", timeout_s=args.timeout)
    from align.tasks.problems import load_problems, read_jsonl
    from align.tasks.verifiers import verify

    rows = read_jsonl(args.responses)  # every row checked before the first verdict
    problems = {p.id: p for p in load_problems(args.problems)[0]}
    checked = []
    for n, row in rows:
        pid = row.get("problem_id", row.get("id"))
        if type(pid) not in (str, int) or str(pid) not in problems:
            raise AlignError(f"{args.responses}:{n}: problem_id {pid!r} is not among the problems")
        if not isinstance(row.get("response"), str):
            raise AlignError(f"{args.responses}:{n}: field 'response' must be a string")
        checked.append((str(pid), row["response"]))
    passed = failed = 0
    for pid, response in checked:
        v = verify(problems[pid], response, limits)
        passed += v.correct
        failed += not v.correct
        print(json.dumps({"problem_id": pid, "correct": v.correct, "observation": v.observation,
                          "extracted": v.extracted, "status": v.status, "isolation": v.isolation}), flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0


def sandbox_main(argv: list[str]):
    parser = ArgumentParser(prog="align sandbox")
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="run one Python file in the sandbox and print the JSON verdict")
    r.add_argument("file")
    r.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds (default 10)")
    r.add_argument("--memory-mb", type=int, default=1024, help="memory of all its processes together (default 1024)")
    args = parser.parse_args(argv)
    limits = _limits("align sandbox run", timeout_s=args.timeout, memory_mb=args.memory_mb)
    from align.core.errors import read_user_text
    from align.tasks.sandbox import run_python

    code = read_user_text(args.file, "program")
    result = run_python(code, limits)
    print(result.to_json())
    return 0
