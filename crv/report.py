"""The run report: `report.json` (stable keys) and `report.md` (tables and plots).

Each stage returns what it measured; this module only gathers those dicts under the
stages' names, adds per-stage timings and peak memory, and renders Markdown: each stage's
section comes from the renderer the stage table (`crv.pipeline.STAGES`) names for it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crv.errors import CRVError
from crv.io import atomic_write_json, atomic_write_text
from crv.pipeline import STAGES, StageResult, peak_memory_mb
from crv.tables import markdown_table


def build_report(results: Sequence[StageResult]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for r in results:
        report[r.name] = r.metrics
    report["timings"] = {r.name: round(r.seconds, 2) for r in results}
    report["reused"] = [r.name for r in results if r.reused]
    report["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return report


def render_markdown(report: dict[str, Any], plots: Sequence[str]) -> str:
    parts = ["# crv run report\n"]
    for stage in STAGES:
        if stage.renderer and stage.name in report:
            parts += [f"## {stage.title}\n", stage.load_renderer()(report[stage.name])]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{Path(p).stem}]({p})\n" for p in plots]
    timings = [{"stage": k, "seconds": v} for k, v in report.get("timings", {}).items()]
    parts += ["## Timings\n", markdown_table(timings)]
    parts.append(f"Reused from cache: {', '.join(report.get('reused', [])) or 'none'}. ")
    parts.append(f"Peak memory: {report.get('peak_memory_mb')} MiB.\n")
    return "\n".join(parts)


def write_report(report: dict[str, Any], results: Sequence[StageResult], run_dir: Path) -> None:
    """Write report.json and report.md into the run directory, copying the stages' plots."""
    plots = []
    for r in results:
        for png in sorted(Path(r.path).glob("*.png")):
            dest = run_dir / "plots" / f"{r.name}_{png.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dest)
            plots.append(str(dest.relative_to(run_dir)))
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report, plots))


SWEEP_METRIC = "transcoders.ce_loss_recovered"
"""The sweep summary's default metric: a number every preset's report holds (a verifier
AUROC is null where a task's test steps hold no incorrect one)."""


def _lookup(report: Any, metric: str) -> tuple[bool, Any]:
    """(whether the dotted `metric` path exists in `report`, its value)."""
    for part in metric.split("."):
        if not isinstance(report, dict) or part not in report:
            return False, None
        report = report[part]
    return True, report


def _metric_paths(report: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path to a number in `report` (the names `crv-sweep-summary` takes)."""
    paths = []
    for key, value in report.items():
        if isinstance(value, dict):
            paths += _metric_paths(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            paths.append(f"{prefix}{key}")
    return paths


def summarize_sweep(multirun_dir: str | Path, metric: str = SWEEP_METRIC) -> str:
    """One Markdown table across a multirun's report.json files, best `metric` first.

    Each row shows the run's overrides (from Hydra's `.hydra/overrides.yaml`) and the metric.
    CRVError for a missing directory, one without reports, or a metric no report has.
    """
    import yaml

    root = Path(multirun_dir)
    if not root.is_dir():
        raise CRVError(f"{root}: no such directory")
    reports = sorted(root.rglob("report.json"))
    if not reports:
        raise CRVError(f"{root}: no report.json under it (not a finished `crv -m` sweep?)")
    rows, found = [], False
    first: dict[str, Any] = {}
    for rep in reports:
        overrides_file = rep.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        report = json.loads(rep.read_text())
        first = first or report
        present, value = _lookup(report, metric)
        if present and value is not None and not isinstance(value, (int, float)):
            from crv.options import did_you_mean

            near = did_you_mean(metric, _metric_paths(report))
            raise CRVError(f"metric {metric!r} is not a number in {rep}{near}")
        found |= present
        rows.append({"run": rep.parent.name, "overrides": " ".join(overrides or []), metric: value})
    if not found:
        from crv.options import did_you_mean

        raise CRVError(
            f"metric {metric!r} is in none of the {len(reports)} reports under {root}"
            f"{did_you_mean(metric, _metric_paths(first))}"
        )
    rows.sort(key=lambda r: (r[metric] is None, -(r[metric] or 0.0)))
    return markdown_table(rows)


def sweep_main() -> None:
    """Console script `crv-sweep-summary MULTIRUN_DIR [METRIC]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="crv-sweep-summary",
        description="One Markdown table across the runs of a sweep (`crv -m ...`): each "
        "run's overrides and one number from its report.json, best first.",
    )
    parser.add_argument(
        "multirun_dir", help="the sweep's directory, e.g. outputs/multirun/<date>/<time>"
    )
    parser.add_argument(
        "metric",
        nargs="?",
        default=SWEEP_METRIC,
        help="dotted path into report.json, e.g. verifier.arithmetic.methods.crv.auroc "
        "(default: %(default)s, which every preset's report holds)",
    )
    args = parser.parse_args()
    try:
        print(summarize_sweep(args.multirun_dir, args.metric), end="")
    except CRVError as exc:
        print(f"crv-sweep-summary: error: {exc}", file=sys.stderr)
        sys.exit(2)
