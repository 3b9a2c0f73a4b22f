"""The report.md section of the `mechanisms` stage: tables a person can read.

Features appear as `L3/F1630` with their card label; every table states the test, the
correction and, in words, when nothing survives it.
"""

from __future__ import annotations

from typing import Any

from crv.tables import escape_cell, markdown_table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _feature_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "feature": f"L{r['layer']}/F{r['feature']}",
            "card": escape_cell(f"`{r['card']}`"),
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
    parts = [
        "### Planted rules: do the features over-represented in incorrect steps' graphs "
        "point at the bug?\n"
    ]
    for name, res in planted.items():
        precision = res.get("precision")
        head = f"- **{name}** ({res['task']}, trigger `{escape_cell(res['trigger'])}`; "
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
                f"  - L{f['layer']}/F{f['feature']} `{escape_cell(f['label'])}` (q {f['q']:.2g}, "
                f"log OR {f['log_odds_ratio']:.2f}): {mark}"
            )
    return parts


def _contrastive_markdown(contrastive: dict[str, Any], planted: dict[str, Any]) -> list[str]:
    parts = [
        "### Contrastive graphs: incorrect steps grouped by the features that drive them\n",
        "Each incorrect test step's contrastive graph explains logit(wrong token) - "
        "logit(correct token) where the step first departs from the correct reduction. A "
        "feature drives the error when its effect on that difference along the graph's paths "
        "is positive. Steps are grouped per task by their sets of drivers (cosine distance, "
        "average linkage, the cut with the best silhouette among 2.."
        f"{contrastive['max_groups']} groups) without any planted-rule label; a group's "
        "features are ranked by their mean effect over its steps (each step's effects scaled "
        "to unit length), the number after each.\n",
    ]
    for task, entry in contrastive["tasks"].items():
        parts.append(
            f"- **{task}**: {entry['n_steps']} incorrect steps in {entry['n_groups']} groups "
            f"({entry['n_without_drivers']} without a driving feature)."
        )
        for g in entry["groups"]:
            rules = g.get("planted_rules")
            mix = ""
            if rules:
                mix = " (" + ", ".join(f"{k or 'no rule'} {v}" for k, v in rules.items()) + ")"
            feats = ", ".join(
                f"L{f['layer']}/F{f['feature']} `{escape_cell(f['label'])}` {f['mean_drive']:.2f}"
                for f in g["features"][:5]
            )
            parts.append(f"  - group {g['group']}, {g['n_steps']} steps{mix}: {feats or 'none'}")
    if any(r.get("method") == "contrastive" for r in planted.values()):
        rows = [
            {
                "rule": f"`{name}`",
                "steps": r["n_steps"],
                "group (size)": "n/a"
                if r["group"] is None
                else f"{r['group']} ({r['group_size']})",
                "recall": "n/a" if r["recall"] is None else f"{r['recall']:.2f}",
                "purity": "n/a" if r["purity"] is None else f"{r['purity']:.2f}",
                "precision (top features)": "n/a"
                if r["precision"] is None
                else f"{r['precision']:.2f} of {r['k']}",
                "base rate": "n/a" if r.get("base_rate") is None else f"{r['base_rate']:.2f}",
                "shares group with": ", ".join(r.get("shares_group_with") or []) or "-",
            }
            for name, r in planted.items()
        ]
        parts += [
            "\nPlanted rules against the grouping: a rule's group is the one holding most of "
            "its incorrect steps; recall is the share of the rule's steps in it, purity the "
            "share of the group's steps that exercise the rule, precision the share of the "
            "group's top features whose card points at the rule's trigger.\n",
            markdown_table(rows),
        ]
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
    if section.get("contrastive"):
        parts += _contrastive_markdown(section["contrastive"], section.get("planted") or {})
    presence = {
        name: r.get("presence") if r.get("method") == "contrastive" else r
        for name, r in (section.get("planted") or {}).items()
    }
    presence = {name: r for name, r in presence.items() if r}
    if presence:
        parts += _planted_markdown(presence)
    elif section.get("planted_skipped"):
        parts.append(f"Planted-rule recovery not run: {section['planted_skipped']}.\n")
    return "\n".join(parts) + "\n"
