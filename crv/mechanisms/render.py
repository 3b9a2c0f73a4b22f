"""The report.md section of the `mechanisms` stage: tables a person can read.

Features appear as `L3/F1630` with their card label; every table states the test, the
correction and, in words, when nothing survives it.
"""

from __future__ import annotations

from typing import Any

from crv.report import markdown_table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _feature_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "feature": f"L{r['layer']}/F{r['feature']}",
            "card": _cell(f"`{r['card']}`"),
            "in incorrect": _pct(r["rate_incorrect"]),
            "in correct": _pct(r["rate_correct"]),
            "log OR": f"{r['log_odds_ratio']:.2f}",
            "q presence": f"{r['q_fisher']:.2g}",
            "q influence": f"{r['q_mwu']:.2g}",
            "influence AUC": f"{r['auc_influence']:.3f}",
        }
        for r in rows
    ]


def _layer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "unit": f"L{r['layer']} {'features' if r['kind'] == 'layer' else 'errors'}",
            "in incorrect": _pct(r["rate_incorrect"]),
            "in correct": _pct(r["rate_correct"]),
            "q presence": f"{r['q_fisher']:.2g}",
            "q influence": f"{r['q_mwu']:.2g}",
            "influence AUC": f"{r['auc_influence']:.3f}",
            "survives": "yes" if r["significant"] else "no",
        }
        for r in rows
    ]


def _planted_markdown(planted: dict[str, Any]) -> list[str]:
    parts = ["### Planted rules: do the top features point at the bug?\n"]
    for name, res in planted.items():
        precision = res.get("precision")
        head = f"- **{name}** ({res['task']}, trigger `{_cell(res['trigger'])}`; "
        head += f"{res['n_incorrect']} incorrect vs {res['n_correct']} correct test steps): "
        if precision is None:
            parts.append(head + res["verdict"] + ".")
            continue
        parts.append(
            head + f"precision {precision:.2f} over the top {res['k']} features "
            f"(base rate among all {res['n_tested']} tested features "
            f"{res['base_rate']:.2f}; {res['n_significant']} survive the correction). "
            f"**{res['verdict']}.**"
        )
        for f in res["features"]:
            mark = "points at the rule" if f["points_at_rule"] else "does not"
            parts.append(
                f"  - L{f['layer']}/F{f['feature']} `{_cell(f['label'])}` (q {f['q']:.2g}, "
                f"log OR {f['log_odds_ratio']:.2f}): {mark}"
            )
    return parts


def mechanisms_markdown(section: dict[str, Any]) -> str:
    """The report.md section of a `mechanisms` result."""
    fdr = section.get("fdr")
    parts = [
        "Test steps only, per task: features of the step graphs that are over-represented "
        "in incorrect steps' graphs (one-sided Fisher's exact test on presence, one-sided "
        "Mann-Whitney U on summed influence in the graphs that contain the unit (influence "
        "AUC: its effect size), Benjamini-Hochberg over both tests of every "
        f"tested unit at FDR {fdr}; features in at least {section.get('min_steps')} graphs "
        "are tested). log OR: log odds ratio of presence (+0.5 per cell). Ranked by the "
        "smaller q; the full table is the artifact's `mechanisms.parquet`.\n"
    ]
    for task, entry in section.get("tasks", {}).items():
        parts.append(
            f"### {task}: {entry['n_incorrect']} incorrect vs {entry['n_correct']} correct steps\n"
        )
        if "note" in entry:
            parts.append(entry["note"] + ".\n")
            continue
        tested, sig = entry["n_tested"], entry["n_significant"]
        if entry["nothing_survives"]:
            parts.append(
                f"**Nothing survives the correction** ({tested['feature']} features, "
                f"{tested['layer']} layers tested); the rows below are the smallest p-values, "
                "not findings.\n"
            )
        else:
            parts.append(
                f"{sig['feature']} of {tested['feature']} tested features, {sig['layer']} of "
                f"{tested['layer']} layers and {sig['error']} of {tested['error']} error-node "
                f"sets survive the correction.\n"
            )
        parts.append(markdown_table(_feature_rows(entry["top"])))
        parts.append(markdown_table(_layer_rows(entry["layers"])))
    if section.get("planted"):
        parts += _planted_markdown(section["planted"])
    elif section.get("planted_skipped"):
        parts.append(f"Planted-rule recovery not run: {section['planted_skipped']}.\n")
    return "\n".join(parts) + "\n"
