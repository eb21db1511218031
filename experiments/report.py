"""Summarise a sweep: ``python experiments/report.py multirun/<date>/<time>``.

Prints the markdown table of every job's results.json (and the broken jobs it skipped), and writes
``report.md``, ``report.csv`` and ``pareto.png`` into the sweep directory. With ``--tofu-logs DIR
--retain-logs DIR`` it instead re-aggregates a pair of TOFU eval-log directories and prints the flat metrics
as JSON. With ``--paper tofu|wmdp`` it prints the paper table of a paper sweep (``experiments/sweeps/paper_*.sh``:
one subdirectory per forget split / corpus) and writes it to ``paper.md``. With ``--regimes`` the directory holds
one sweep per regime (``experiments/sweeps/compare.sh``): it prints their matched tables side by side
and writes ``regimes.md``. Bad input: one line on stderr, exit code 2.

As a Hydra callback (``hydra/callbacks=report``: :class:`SweepReport`) the sweep's own process writes the report once
its jobs are done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kfade.cache import atomic_path
from kfade.errors import ConfigError
from kfade.report.paper_table import TABLES, paper_table
from kfade.report.regimes import write_regimes_report
from kfade.report.report import aggregate_log_dirs, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun (or single run) directory")
    parser.add_argument("--tofu-logs", metavar="DIR", help="TOFU eval-log dir of the model to score")
    parser.add_argument("--retain-logs", metavar="DIR", help="TOFU eval-log dir of the retain model")
    parser.add_argument("--paper", choices=sorted(TABLES), help="the paper table of a paper sweep dir")
    parser.add_argument("--regimes", action="store_true", help="sweep_dir holds one sweep per regime: compare them")
    args = parser.parse_args(argv)
    log_mode = args.tofu_logs is not None or args.retain_logs is not None
    if log_mode and (args.tofu_logs is None or args.retain_logs is None or args.sweep_dir is not None):
        parser.error("--tofu-logs and --retain-logs go together, without a sweep dir")
    if args.regimes and args.paper is not None:
        parser.error("--regimes and --paper are separate reports")
    if not log_mode and args.sweep_dir is None:
        parser.error("give a sweep dir, or --tofu-logs DIR --retain-logs DIR")
    return args


def summarise(sweep_dir: str | Path) -> None:
    """Write and print the report of one sweep directory."""
    _, markdown = write_report(sweep_dir)
    print(markdown, end="")
    root = Path(sweep_dir)
    print(f"\nwritten: {root / 'report.md'}, {root / 'report.csv'}, plot: {root / 'pareto.png'}")


class SweepReport(Callback):
    """Hydra callback: the report of a multirun, written by the sweeping process at its end (a bad sweep is one
    line on stderr; the jobs' results stand)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            summarise(config.hydra.sweep.dir)
        except ConfigError as err:
            print(f"report: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.tofu_logs is not None:
            print(json.dumps(aggregate_log_dirs(args.tofu_logs, args.retain_logs), indent=2, sort_keys=True))
        elif args.paper is not None:
            table = paper_table(args.sweep_dir, args.paper)
            with atomic_path(Path(args.sweep_dir) / "paper.md") as tmp:
                tmp.write_text(table)
            print(table, end="")
            print(f"\nwritten: {Path(args.sweep_dir) / 'paper.md'}")
        elif args.regimes:
            print(write_regimes_report(args.sweep_dir), end="")
            print(f"\nwritten: {Path(args.sweep_dir) / 'regimes.md'}")
        else:
            summarise(args.sweep_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
