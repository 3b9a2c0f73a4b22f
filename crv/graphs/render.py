"""One step graph as a self-contained HTML page (inline SVG, no scripts, no network).

Layers are rows (token nodes at the bottom, logits at the top, error nodes beside the
features of their layer), positions are columns. Node area grows with influence; edges are
drawn blue (excitatory) or red (inhibitory) with a width and opacity that grow with |weight|.
Hovering a node or edge shows its details.

    from crv.graphs.render import write_html
    write_html(graph, "step.html", tokens=tokenizer.convert_ids_to_tokens(input_ids),
               vocab=tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crv.graphs.graph import ERROR, FEATURE, KIND_NAMES, LOGIT, TOKEN, StepGraph
from crv.io import atomic_write_text

_COLORS = {FEATURE: "#f2a541", ERROR: "#9e9e9e", TOKEN: "#5aa469", LOGIT: "#8e6cc0"}
_CELL_W, _ROW_H, _MARGIN = 46, 70, 60


def _layout(g: StepGraph) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """x, y of every node, the positions shown (columns) and the number of rows."""
    positions = sorted(set(g.pos.tolist()))
    column = {p: i for i, p in enumerate(positions)}
    n_rows = int(g.layer.max()) + 2 if g.n_nodes else 1  # tokens (-1) .. logits
    x, y = np.zeros(g.n_nodes), np.zeros(g.n_nodes)
    slots: dict[tuple[int, int], int] = {}
    for i in range(g.n_nodes):
        kind = int(g.kind[i])
        row = int(g.layer[i]) + 1
        key = (row, int(g.pos[i]) if kind != LOGIT else -1)
        k = slots.get(key, 0)
        slots[key] = k + 1
        if kind == LOGIT:  # logits spread along the top row
            x[i] = _MARGIN + k * _CELL_W
        else:
            offset = 0.55 if kind == ERROR else (k % 4) * 0.12
            x[i] = _MARGIN + (column[int(g.pos[i])] + offset) * _CELL_W
        y[i] = _MARGIN + (n_rows - 1 - row) * _ROW_H + (k // 4 % 3) * 12 * (kind == FEATURE)
    return x, y, positions, n_rows


def _label(g: StepGraph, i: int, tokens: Sequence[str] | None) -> str:
    kind = int(g.kind[i])
    name = KIND_NAMES[kind]
    if kind == FEATURE:
        text = f"{name} L{g.layer[i]} pos {g.pos[i]} #{g.feature[i]} act {g.activation[i]:.3g}"
    elif kind == ERROR:
        text = f"{name} L{g.layer[i]} pos {g.pos[i]}"
    else:
        token = tokens[int(g.feature[i])] if tokens is not None and kind == LOGIT else None
        token = token if token is not None else f"id {g.feature[i]}"
        text = f"{name} pos {g.pos[i]} {token}" + (
            f" p {g.activation[i]:.3g}" if kind == LOGIT else ""
        )
    return f"{text}; influence {g.influence[i]:.3g}"


def render_html(
    g: StepGraph, tokens: Sequence[str] | None = None, vocab: Sequence[str] | None = None
) -> str:
    """The page for `g`; `tokens` labels the columns (the input tokens by position) and
    `vocab` (token strings by id) names the logits."""
    x, y, positions, n_rows = _layout(g)
    width = _MARGIN * 2 + max(len(positions), int((g.kind == LOGIT).sum())) * _CELL_W
    height = _MARGIN * 2 + n_rows * _ROW_H
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">'
    ]
    w_max = float(np.abs(g.weight).max()) if g.n_edges else 1.0
    for s, d, w in zip(g.src.tolist(), g.dst.tolist(), g.weight.tolist(), strict=True):
        strength = abs(w) / w_max
        color = "#2b6cb0" if w > 0 else "#c53030"
        parts.append(
            f'<line x1="{x[s]:.1f}" y1="{y[s]:.1f}" x2="{x[d]:.1f}" y2="{y[d]:.1f}" stroke="{color}" '
            f'stroke-width="{0.3 + 2.5 * strength:.2f}" stroke-opacity="{0.15 + 0.7 * strength:.2f}">'
            f"<title>{w:+.4g}</title></line>"
        )
    inf_max = float(g.influence.max()) if g.n_nodes and g.influence.max() > 0 else 1.0
    for i in range(g.n_nodes):
        r = 3 + 7 * np.sqrt(max(float(g.influence[i]), 0.0) / inf_max)
        title = html.escape(_label(g, i, vocab))
        parts.append(
            f'<circle cx="{x[i]:.1f}" cy="{y[i]:.1f}" r="{r:.1f}" fill="{_COLORS[int(g.kind[i])]}" '
            f'stroke="#333" stroke-width="0.5"><title>{title}</title></circle>'
        )
    for p in positions:
        label = tokens[p] if tokens is not None and p < len(tokens) else str(p)
        cx = _MARGIN + (positions.index(p) + 0.2) * _CELL_W
        parts.append(
            f'<text x="{cx:.1f}" y="{height - 15}">{html.escape(repr(label)[1:-1])}</text>'
        )
    for row in range(n_rows):
        name = "tokens" if row == 0 else ("logits" if row == n_rows - 1 else f"L{row - 1}")
        parts.append(f'<text x="5" y="{_MARGIN + (n_rows - 1 - row) * _ROW_H + 4}">{name}</text>')
    parts.append("</svg>")
    scores = ", ".join(f"{k} {v:.3g}" for k, v in sorted(g.scores.items()))
    title = html.escape(f"trace {g.trace_id}, step {g.step}, position {g.position}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family:sans-serif'><h3>{title}</h3><p>{g.n_nodes} nodes, {g.n_edges} "
        f"edges; {html.escape(scores)}</p>{''.join(parts)}</body></html>"
    )


def write_html(
    g: StepGraph,
    path: str | Path,
    tokens: Sequence[str] | None = None,
    vocab: Sequence[str] | None = None,
) -> Path:
    """Write `render_html(g, tokens, vocab)` to `path` atomically."""
    return atomic_write_text(path, render_html(g, tokens, vocab))
