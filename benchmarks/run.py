"""Run the benchmarks: ``python -m benchmarks.run [--smoke] [--only NAME] [--out DIR] ...``.

Every ``benchmarks/bench_*.py`` that defines ``BENCHMARK`` is a benchmark. Each run writes
``<out>/<name>.json`` (the figure, its baseline from the same run, their ratios, the goals, the
machine) and, unless ``--no-plots``, ``<out>/<name>.png``; a full run into the default directory
also rewrites the results table in ``benchmarks/README.md``. ``--smoke`` uses tiny sizes: it only
shows that each benchmark runs and writes a valid file (the numbers mean nothing).

Exit status: 0 when every benchmark ran (goals not met included: benchmarks are not tests),
1 when one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    Benchmark,
    Context,
    Progress,
    Result,
    Skipped,
    machine_info,
    write_json,
)

README = REPO_ROOT / "benchmarks" / "README.md"
TABLE_START = "<!-- results-table:start -->"
TABLE_END = "<!-- results-table:end -->"
#: Keys every result file has (the smoke test checks them).
DOCUMENT_KEYS = (
    "benchmark",
    "title",
    "machine",
    "params",
    "results",
    "baseline",
    "ratios",
    "goals",
    "table",
    "notes",
    "skipped",
    "error",
    "started",
    "duration_s",
)


def discover() -> list[Benchmark]:
    """Every ``BENCHMARK`` in ``benchmarks/bench_*.py``, in their ``order``."""
    found: list[Benchmark] = []
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        benchmark = getattr(module, "BENCHMARK", None)
        if isinstance(benchmark, Benchmark):
            found.append(benchmark)
    return sorted(found, key=lambda b: (b.order, b.name))


def _document(
    benchmark: Benchmark,
    machine: dict[str, Any],
    smoke: bool,
    started: str,
    duration: float,
    result: Result | None,
    skipped: str | None,
    error: str | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"smoke": smoke}
    if result is not None:
        params.update(result.params)
    return {
        "benchmark": benchmark.name,
        "title": benchmark.title,
        "machine": machine,
        "params": params,
        "results": result.results if result else {},
        "baseline": result.baseline if result else {},
        "ratios": result.ratios if result else {},
        "goals": result.goals_json() if result else {"met": False},
        "table": [vars(row) for row in result.rows] if result else [],
        "notes": result.notes if result else [],
        "skipped": skipped,
        "error": error,
        "started": started,
        "duration_s": duration,
    }


def _fmt_ratio(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_met(value: Any) -> str:
    return {True: "yes", False: "**no**"}.get(value, "")


def _print_summary(progress: Progress, document: dict[str, Any]) -> None:
    if document["skipped"]:
        progress(f"skipped: {document['skipped']}")
        return
    if document["error"]:
        progress(f"FAILED: {document['error'].strip().splitlines()[-1]}")
        return
    for row in document["table"]:
        goal = f"  goal {row['goal']}: {'met' if row['met'] else 'NOT met'}" if row["goal"] else ""
        progress(
            f"{row['measure']}: {row['figure']} vs {row['baseline']} "
            f"(ratio {_fmt_ratio(row['ratio'])}){goal}"
        )
    for note in document["notes"]:
        progress(f"note: {note}")
    progress(f"done in {document['duration_s']:.1f} s")


def _load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def run_one(
    benchmark: Benchmark, ctx: Context, machine: dict[str, Any], out: Path, plots: bool
) -> dict[str, Any]:
    """Run one benchmark, write its JSON (and PNG), return the document."""
    ctx.progress.prefix = benchmark.name
    ctx.progress(f"starting: {benchmark.title}")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = {**machine, "load_average": _load_average()}  # the load as this one starts
    t0 = time.perf_counter()
    result: Result | None = None
    skipped: str | None = None
    error: str | None = None
    try:
        result = benchmark.run(ctx)
    except Skipped as exc:
        skipped = str(exc)
    except Exception:
        error = traceback.format_exc()
    machine["load_average_end"] = _load_average()  # a busy neighbour shows here
    document = _document(
        benchmark,
        machine,
        ctx.smoke,
        started,
        time.perf_counter() - t0,
        result,
        skipped,
        error,
    )
    write_json(out / f"{benchmark.name}.json", document)
    if plots and result is not None and benchmark.plot is not None:
        try:
            benchmark.plot(
                json.loads((out / f"{benchmark.name}.json").read_text()),
                out / (f"{benchmark.name}.png"),
            )
        except Exception:
            ctx.progress(f"plot failed:\n{traceback.format_exc()}")
    _print_summary(ctx.progress, document)
    ctx.progress.prefix = ""
    return document


def results_table(benchmarks: Sequence[Benchmark], out: Path) -> str:
    """The Markdown table (and run lines) from the result files in ``out``."""
    lines = [
        "| benchmark | measure | figure | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs: list[str] = []
    for benchmark in benchmarks:
        path = out / f"{benchmark.name}.json"
        if not path.exists():
            continue
        document = json.loads(path.read_text())
        machine = document.get("machine", {})
        runs.append(
            f"- `{benchmark.name}`: {document['started']}, {document['duration_s']:.0f} s, "
            f"{machine.get('cores')} cores ({machine.get('cpu_model')}), "
            f"Python {machine.get('python')}, load average (1, 5, 15 min) at start "
            f"{', '.join(f'{x:.2f}' for x in machine.get('load_average', []))}, at end "
            f"{', '.join(f'{x:.2f}' for x in machine.get('load_average_end', []))}"
            + (
                " (smoke: sizes too small to mean anything)"
                if document["params"].get("smoke")
                else ""
            )
        )
        if document.get("skipped") or document.get("error"):
            why = document.get("skipped") or "failed"
            lines.append(f"| {benchmark.name} | {why} | | | | | |")
            continue
        for row in document["table"]:
            lines.append(
                f"| {benchmark.name} | {row['measure']} | {row['figure']} | {row['baseline']} | "
                f"{_fmt_ratio(row['ratio'])} | {row['goal']} | "
                f"{_fmt_met(row['met']) if row['goal'] else ''} |"
            )
    return "\n".join([*lines, "", "Runs:", "", *runs])


def update_readme(benchmarks: Sequence[Benchmark], out: Path, readme: Path = README) -> bool:
    """Rewrite the table between the markers in ``readme``; False if the markers are missing."""
    text = readme.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        return False
    table = results_table(benchmarks, out)
    new = text[: start + len(TABLE_START)] + "\n" + table + "\n" + text[end:]
    temp = readme.with_name(readme.name + ".tmp")
    temp.write_text(new)
    temp.replace(readme)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the selected benchmarks, write results; the exit status."""
    benchmarks = discover()
    names = [b.name for b in benchmarks]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run the dps-mqtt benchmarks (each figure beside a same-run baseline).",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check each one runs")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeatable or comma-separated): {', '.join(names)}",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="where results go (default: %(default)s)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG (no matplotlib)")
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="leave benchmarks/README.md alone (it is only updated by full runs into the "
        "default --out)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for benchmark in benchmarks:
            print(f"{benchmark.name:14} {benchmark.title}")
        return 0
    selected = benchmarks
    if args.only:
        wanted = {name.strip() for item in args.only for name in item.split(",") if name.strip()}
        unknown = wanted - set(names)
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {names}")
        selected = [b for b in benchmarks if b.name in wanted]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    progress = Progress()
    mode = "smoke" if args.smoke else "full"
    progress(f"{mode} run of {', '.join(b.name for b in selected)} -> {out}")
    machine = machine_info()
    progress(
        f"machine: {machine['cores']} cores ({machine['cpu_model']}), Python {machine['python']}, "
        f"load {machine['load_average']}"
    )
    failed = []
    with Context(smoke=args.smoke, progress=progress) as ctx:
        for benchmark in selected:
            document = run_one(benchmark, ctx, machine, out, plots=not args.no_plots)
            if document["error"]:
                failed.append(benchmark.name)
    if not (args.smoke or args.no_readme) and out == RESULTS_DIR.resolve():
        if update_readme(benchmarks, out):
            progress(f"results table updated in {README.relative_to(REPO_ROOT)}")
        else:
            progress(f"no {TABLE_START} ... {TABLE_END} markers in {README}; table not written")
    if failed:
        progress(f"failed: {', '.join(failed)}")
        return 1
    progress("all benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
