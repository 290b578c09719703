"""``izitorch`` / ``python -m izitorch``: run, validate, plugins, report, evaluate, predict, export.

The only argparse of the manifest world. A user's mistake prints one line,
``izitorch: error: <cause and fix>``, and exits 2 (1 for a failure during training).
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from izitorch.distributed import rank_label
from izitorch.errors import IzitorchError, describe, join_path, located_in, one_line
from izitorch.streams import say, silence


class UsageError(IzitorchError):
    """A command-line mistake (an unknown flag, a missing value, no command)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line like any other (no usage block): ``main`` prints it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; `izitorch --help` (or `izitorch COMMAND --help`) shows the usage")


def build_parser() -> argparse.ArgumentParser:
    from izitorch.version import __version__

    parser = ArgumentParser(prog="izitorch", description="Train and compare PyTorch models described by a TOML manifest.")
    parser.add_argument("--version", action="version", version=f"izitorch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)

    run = commands.add_parser("run", help="train the models of a manifest")
    validate = commands.add_parser("validate", help="check a manifest without training: build the data, models and plugins, one forward and loss per model")
    for sub in (run, validate):
        sub.add_argument("manifest", help="path to the manifest (.toml)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a manifest value, e.g. --set run.epochs=3 --set models[0].params.hidden=32",
        )
    run.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in res_dir")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in res_dir (finished folds are kept)")

    commands.add_parser("plugins", help="list the installed plugins, their versions and hooks")
    report = commands.add_parser("report", help="compare the models of one or more runs (finished or interrupted)")
    report.add_argument("res_dirs", nargs="+", metavar="res_dir", help="a run's res_dir (several: their models side by side)")
    report.add_argument("--format", default="table", help="table (default), markdown, csv or json")
    report.add_argument("--metric", default=None, help="rank by this metric (default: the task's headline metric)")
    report.add_argument("--per-class", action="store_true", help="each classifier's precision, recall, F1 and IoU per class (mean over folds)")
    report.add_argument("--plots", action="store_true", help='write PNG figures into each RES_DIR/plots (pip install "izitorch[plots]")')
    add_use_commands(commands)
    return parser


#: The commands that use a finished run; they write nothing but their --out file, atomically.
USING = ("evaluate", "predict", "export")


def add_use_commands(commands: argparse._SubParsersAction) -> None:
    """``evaluate``, ``predict`` and ``export``: a finished run's models, used (:mod:`izitorch.trained`)."""
    evaluate = commands.add_parser("evaluate", help="score every model (every fold) of a finished run on its test split or on --data")
    predict = commands.add_parser("predict", help="write one model's predictions on a dataset to a CSV file")
    export = commands.add_parser("export", help="write one model as safetensors (weights) or ONNX (graph and weights)")
    for sub in (evaluate, predict, export):
        sub.add_argument("res_dir", help="the finished run's res_dir")
        if sub is not evaluate:
            sub.add_argument("--model", required=True, help="the model's name")
            sub.add_argument("--fold", type=int, default=None, help="the fold (1 to k) of a k-fold run")
        sub.add_argument(
            "--which",
            choices=("best", "last"),
            default=None,
            help="the best or the last epoch's weights (default: those the run's final test scored)",
        )
        data_help = 'a dataset "module:callable" (or "file.py:callable"), called with --set data.params.<key>=<value>'
        sub.add_argument("--data", required=sub is predict, metavar="REF", help=data_help + ("" if sub is predict else "; default: the run's own"))
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recorded value, e.g. --set run.batch_size=256"
        )
        sub.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evaluate.add_argument("--out", metavar="FILE.json", help="also write the scores to this JSON file (outside RES_DIR)")
    predict.add_argument("--out", required=True, metavar="FILE.csv", help="the CSV file to write (outside RES_DIR)")
    export.add_argument("--format", required=True, choices=("safetensors", "onnx"), help="safetensors (weights) or onnx")
    export.add_argument("--out", metavar="PATH", help="the file to write (default: <model>[_fold<k>].<format> here)")


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help and --version print, then argparse exits 0
            return done.code if isinstance(done.code, int) else 0
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:
            sys.stdout.flush()  # an output that went away shows here, not as a failed flush at exit
    except IzitorchError as error:
        say(f"izitorch: error: {rank_label()}{error}", sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if args is not None and args.command in USING:  # a run's first Ctrl-C stops it cleanly; these have nothing to save
            say(f"izitorch: {args.command} interrupted; nothing was written", sys.stderr)
            return 130
        say("izitorch: aborted by a second interrupt; the epochs finished before the first one are saved (use --resume)", sys.stderr)
        return 130
    except OSError as error:
        # a listing's output went away (a file's failure names the file); a run's console
        # silences itself, so an error escaping a run is a failure of the run, never hidden here
        if (args is not None and args.command == "run") or error.filename is not None or error.errno not in (errno.EPIPE, errno.ENOSPC):
            raise
        silence(sys.stdout)
        if error.errno == errno.EPIPE:
            return 0  # its reader left (| head -1): what it did not read is dropped
        say(f"izitorch: error: cannot write the output: {error.strerror}", sys.stderr)
        return 1
    return code


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
    from izitorch.runner import check_splits, registered_metrics
    from izitorch.selection import warn_test_set_choices
    from izitorch.sweeps import describe_sweeps
    from izitorch.state import Run

    config = load_manifest(args.manifest, args.overrides)
    with located_in(config.source):
        pm, versions = make_plugin_manager(config)
        factories = registered_metrics(pm, config)
        device = pick_device(config.run.device)
        dataset, slots, task, selection = dry_run(config, device, factories)
        session = Run(config, pm, device, Path(config.run.res_dir), dataset=dataset, slots=slots)
        check_splits(pm.hook.izitorch_make_splits(run=session, dataset=dataset), len(dataset))  # a class too small for the folds, say
    warn_test_set_choices(config, versions)
    models = ", ".join(spec.name for spec in config.models)
    plugins = ", ".join(name for name in versions)
    picks = f"best epoch by {selection.key}" if selection.key is not None else "no best epoch"
    print(f"{args.manifest}: OK ({len(config.models)} model(s): {models}; plugins: {plugins}; task: {task or 'not inferred'}, {picks})")
    for line in describe_sweeps(config.models):
        print(line)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from izitorch.pluginmanager import describe_plugins

    for info in describe_plugins():
        flag = "essential" if info.essential else "default" if info.default else "optional"
        print(f"{info.name} {info.version} ({flag}) -> {info.origin}")
        print(f"    hooks: {', '.join(info.hooks) or '-'}")
        for option in info.options:
            print(f"    [plugins.{info.name}] {option.key} = {option.default}" + (f": {option.doc}" if option.doc else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from izitorch.report import build, check_format, per_class_tables, render

    fmt = check_format(args.format)
    for res_dir in map(Path, args.res_dirs):
        if not (res_dir / "conf.json").is_file():
            if len(args.res_dirs) == 1 and (res_dir / "results.json").is_file():
                return _report_from_summary(res_dir / "results.json")  # results.json alone: its table
            raise IzitorchError(f'{res_dir / "conf.json"} not found: "{res_dir}" holds no izitorch run (a run writes conf.json when it starts)')
        if (res_dir / "results.json").is_file():
            load_summary(res_dir / "results.json")  # a damaged one is refused, naming its key
    report = build(args.res_dirs, args.metric, args.per_class)
    if args.plots:
        from izitorch.plots import matplotlib_figure, write_plots
        from izitorch.results import load

        matplotlib_figure()  # a missing extra is one line before anything is drawn
    text = render(report, fmt)
    if args.per_class and fmt in ("table", "markdown"):  # csv and json: not a table of models / in the models' entries
        text += "\n" + per_class_tables(report, fmt)
    print(f"final test scores:\n{text}" if fmt == "table" else text)
    if args.plots:
        for res_dir in args.res_dirs:
            own = {**report, "models": [model for model in report["models"] if model["run"] == str(Path(res_dir))]}
            written = write_plots(load(res_dir, frames=False), own)
            print(f"izitorch: {len(written)} figure(s) written to {Path(res_dir) / 'plots'}", file=sys.stderr)
    return 0


def _report_from_summary(summary_file: Path) -> int:
    """The table of a ``results.json`` without its run folder (copied on its own): means only."""
    from izitorch.table import comparison_table

    summary = load_summary(summary_file)
    directions = {key: value for entry in summary.values() for key, value in entry.get("directions", {}).items()}
    headline = next((entry["headline"] for entry in summary.values() if isinstance(entry.get("headline"), str)), None)
    parameters = {name: entry["params"] for name, entry in summary.items() if isinstance(entry.get("params"), int)}
    print(comparison_table({name: [entry["mean"]] for name, entry in summary.items()}, parameters, directions=directions, headline=headline))
    return 0


def read_summary(path: Path) -> dict[str, list[dict]]:
    """``results.json`` as the comparison table takes it (each model's mean scores), refused in one
    line when it is not what a run writes: truncated, not JSON, or of another structure."""
    return {name: [entry["mean"]] for name, entry in load_summary(path).items()}


def load_summary(path: Path) -> dict[str, dict]:
    """``results.json``: each model's ``mean`` (a number for every metric) and, when written,
    ``directions`` (value name -> "higher" / "lower"); refused in one line otherwise."""
    from izitorch.table import is_metric

    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise IzitorchError(
            f"not a results file izitorch wrote ({type(error).__name__}: {one_line(str(error))}); run the manifest again (--overwrite) to rewrite it",
            source=str(path),
        ) from None
    except OSError as error:
        raise IzitorchError(f"cannot read it: {error.strerror or error}", source=str(path)) from None
    if not isinstance(summary, dict):
        raise IzitorchError(f"expected a table of models, found {describe(summary)}; run the manifest again (--overwrite) to rewrite it", source=str(path))
    for name, entry in summary.items():
        mean = entry.get("mean") if isinstance(entry, dict) else None
        if not isinstance(mean, dict):
            raise IzitorchError(
                f'expected the model\'s scores with a "mean" table, found {describe(entry)}; run the manifest again (--overwrite) to rewrite it',
                join_path(name, "mean"),
                str(path),
            )
        for key, value in mean.items():
            if is_metric(key, 0.0) and not is_metric(key, value):  # a metric's key, holding no number
                raise IzitorchError(
                    f"expected a number, found {describe(value)}; run the manifest again (--overwrite) to rewrite it",
                    join_path(join_path(name, "mean"), key),
                    str(path),
                )
        directions = entry.get("directions", {})
        if not isinstance(directions, dict) or not all(value in ("higher", "lower") for value in directions.values()):
            raise IzitorchError(
                f'expected a table of "higher" / "lower", found {describe(directions)}; run the manifest again (--overwrite) to rewrite it',
                join_path(name, "directions"),
                str(path),
            )
    return summary


def cmd_evaluate(args: argparse.Namespace) -> int:
    from izitorch.evaluate import check_out, evaluate, report
    from izitorch.io import write_json
    from izitorch.table import comparison_table

    if args.out is not None:
        check_out(args.out, args.res_dir, args.overwrite)
    evaluation = evaluate(args.res_dir, args.data, args.overrides, args.which)
    table = comparison_table(evaluation.scores, evaluation.parameters, evaluation.directions)
    print(table.replace("final test scores:", f"scores on {evaluation.data} ({args.which or 'weights the run tested'}):", 1))
    if args.out is not None:
        write_json(check_out(args.out, args.res_dir, args.overwrite), report(evaluation, args.which))
        print(f"izitorch: scores written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from izitorch.predict import predict

    rows = predict(args.res_dir, args.model, args.data, args.out, args.fold, args.which, args.overrides, args.overwrite)
    print(f"izitorch: {rows} prediction(s) of {args.model} written to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from izitorch.export import export

    path = export(args.res_dir, args.model, args.format, args.out, args.fold, args.which, args.data, args.overrides, args.overwrite)
    print(f"izitorch: {args.model} exported to {path}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
}
