"""``izitorch`` / ``python -m izitorch``: run, validate, plugins, report.

The only argparse of the manifest world. A user's mistake prints one line,
``izitorch: error: <cause and fix>``, and exits 2 (1 for a failure during training).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from izitorch.errors import IzitorchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="izitorch", description="Train and compare PyTorch models described by a TOML manifest.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train the models of a manifest")
    validate = commands.add_parser("validate", help="check a manifest without training: build the data, models and plugins, one forward and loss per model")
    for sub in (run, validate):
        sub.add_argument("manifest", help="path to the manifest (.toml)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a manifest value, e.g. --set run.epochs=3 --set models[0].params.hidden=32")
    run.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in res_dir")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in res_dir (finished folds are kept)")

    commands.add_parser("plugins", help="list the installed plugins, their versions and hooks")
    report = commands.add_parser("report", help="print the comparison table of a finished run")
    report.add_argument("res_dir", help="the run's res_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except IzitorchError as error:
        print(f"izitorch: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("izitorch: aborted by a second interrupt; the epochs finished before the first one are saved (use --resume)", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from izitorch.manifest import load_manifest
    from izitorch.runner import run

    overrides = list(args.overrides) + (["run.overwrite=true"] if args.overwrite else []) + (["run.resume=true"] if args.resume else [])
    run(load_manifest(args.manifest, overrides))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the manifest and its plugins, then build what ``run`` builds and take one forward and
    loss per model on a few samples (:func:`izitorch.checks.dry_run`); nothing is written."""
    from izitorch.checks import dry_run
    from izitorch.data import pick_device
    from izitorch.manifest import load_manifest
    from izitorch.pluginmanager import make_plugin_manager

    config = load_manifest(args.manifest, args.overrides)
    _, versions = make_plugin_manager(config)
    dry_run(config, pick_device(config.run.device))
    models = ", ".join(spec.name for spec in config.models)
    plugins = ", ".join(name for name in versions)
    print(f"{args.manifest}: OK ({len(config.models)} model(s): {models}; plugins: {plugins})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from izitorch.pluginmanager import describe_plugins

    for info in describe_plugins():
        flag = "default" if info.default else "optional"
        print(f"{info.name} {info.version} ({flag}) -> {info.origin}")
        print(f"    hooks: {', '.join(info.hooks) or '-'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from izitorch.io import read_json
    from izitorch.plugins.console import comparison_table

    res_dir = Path(args.res_dir)
    summary_file = res_dir / "results.json"
    if not summary_file.is_file():
        raise IzitorchError(f'{summary_file} not found: "{res_dir}" holds no finished run (results.json is written at the end of a run)')
    summary = read_json(summary_file)
    results = {name: [entry["mean"]] for name, entry in summary.items()}
    print(comparison_table(results))
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "report": cmd_report}
