"""Step keys: the columns that identify a trace's step in every per-step table (features,
baselines, mechanisms), read from the traces dataset."""

from __future__ import annotations

import pandas as pd

KEY_COLUMNS = (
    "step_id",
    "trace_id",
    "step",
    "task",
    "complexity",
    "split",
    "label",
    "planted_rule",
    "n_prefix_tokens",
)
"""Columns identifying a step in the feature and baseline tables (label: 1 incorrect,
0 correct, -1 unknown; planted_rule: the planted bug the step exercises, "" for none)."""


def label_code(label: bool | None) -> int:
    """Trace step label (True = correct, False = incorrect, None = unknown) as the
    classification target: 1 = incorrect (positive), 0 = correct, -1 = unknown."""
    if label is None:
        return -1
    return 0 if label else 1


def step_key_table(traces) -> pd.DataFrame:
    """One row per step of every trace with the `KEY_COLUMNS` (n_prefix_tokens = the
    step's last token index + 1; planted_rule "" where the step has no such field) plus
    `last_token` and `prev_last_token` (the previous step's last token, or prompt_len - 1
    for the first step)."""
    rows = []
    cols = ["id", "task", "complexity", "split", "prompt_len", "steps"]
    for tr in traces.select_columns(cols):
        prev = int(tr["prompt_len"]) - 1
        for st in tr["steps"]:
            last = int(st["last_token"])
            rows.append(
                {
                    "step_id": f"{tr['id']}:{int(st['index'])}",
                    "trace_id": tr["id"],
                    "step": int(st["index"]),
                    "task": tr["task"],
                    "complexity": int(tr["complexity"]),
                    "split": tr["split"],
                    "label": label_code(st["label"]),
                    "planted_rule": st.get("planted_rule") or "",
                    "n_prefix_tokens": last + 1,
                    "last_token": last,
                    "prev_last_token": prev,
                }
            )
            prev = last
    return pd.DataFrame(rows, columns=[*KEY_COLUMNS, "last_token", "prev_last_token"])
