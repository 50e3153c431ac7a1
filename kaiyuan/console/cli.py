"""``kaiyuan console-rollup``: bring the console's hourly rollup up to date, or rebuild it.

The running gateway keeps the rollup current by itself (it sums every row written since its last
pass, whatever the row's time); run this to prepare a big log before the first start, or
``--rebuild`` after deleting log rows (the rollup keeps what it summed) or to repair it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kaiyuan.cli import EXTRA_COMMANDS


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: $KAIYUAN_CONFIG, else the zero config)")
    p.add_argument("--db", help="database URL (default: the config's store.url)")
    p.add_argument("--rebuild", action="store_true", help="drop the rollup and sum the whole log again")


def run(args: argparse.Namespace) -> int:
    from kaiyuan.config import load_config
    from kaiyuan.console import rollup
    from kaiyuan.store.db import open_store

    url = args.db or load_config(args.config or os.environ.get("KAIYUAN_CONFIG")).store.url
    engine = open_store(url)
    t0 = time.perf_counter()
    rows = (rollup.rebuild if args.rebuild else rollup.catch_up)(engine)
    print(f"{'rebuilt' if args.rebuild else 'caught up'}: {rows} request-log row(s) summed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


EXTRA_COMMANDS.append(("console-rollup", "update (or --rebuild) the console's hourly usage rollup", add_args, run))
