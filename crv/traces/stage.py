"""The `traces` stage: the subject model's chains of thought, split into labelled steps.

For each problem the subject model greedily writes a completion; the completion is split
into steps, each step is labelled by the task's exact checker (synthetic tasks) or by the
labels a file provides (GSM8K format), and the token holding each step's last character is
located in the exact token sequence the model saw. Steps after the first incorrect one are
dropped, as in CRV: once a chain has gone wrong, later steps are judged against a wrong
premise. A step the checker cannot parse is labelled incorrect and counted separately.

The artifact is a `datasets.Dataset` (`save_to_disk`) with one row per problem; columns are
listed in docs/architecture.md. Train/test split is by problem (`make_splits`), so no
problem's steps appear in both.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crv.pipeline import StageContext
from crv.traces.config import TracesConfig

log = logging.getLogger("crv.traces")


def load_traces(path: str | Path):
    """The traces dataset of a `traces` artifact."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "dataset"))


def few_shot_prefix(task: str, k: int, seed: int, exclude: set[str]) -> str:
    """`k` solved 3-operator problems in the canonical format, none of them in `exclude`."""
    from crv.tasks import generate_problems

    pool = generate_problems(task, 3, 50 * k, seed=10_000 + seed, unique=True)
    shots = [p for p in pool if p.expression not in exclude][:k]
    return "".join(p.prompt + p.solution() + "\n" for p in shots)


def _synthetic_rows(cfg: TracesConfig, seed: int) -> list[dict[str, Any]]:
    from crv.tasks import make_splits

    rows = []
    for task in cfg.tasks:
        train, test = make_splits(
            task,
            cfg.complexities,
            cfg.n_per_complexity,
            cfg.test_frac,
            seed,
            cfg.n_test_per_complexity.get(task),
        )
        used = {p.expression for p in train + test}
        prefix = few_shot_prefix(task, cfg.few_shot, seed, used) if cfg.few_shot else ""
        for split, problems in (("train", train), ("test", test)):
            for p in problems:
                rows.append(
                    {
                        "id": p.id,
                        "task": task,
                        "complexity": p.complexity,
                        "problem": p.expression,
                        "gold": p.gold,
                        "prompt": prefix + p.prompt,
                        "reference": p.solution(),
                        "split": split,
                    }
                )
    return rows


def _gsm8k_rows(cfg: TracesConfig, seed: int) -> list[dict[str, Any]]:
    import random

    from crv.tasks.gsm8k import load_gsm8k

    records = load_gsm8k(cfg.gsm8k_path, limit=cfg.gsm8k_limit)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(cfg.test_frac * len(records))
    test_ids = set(order[:n_test])
    rows = []
    for i, rec in enumerate(records):
        rows.append(
            {
                "id": str(rec.get("id") or f"gsm8k-{i:06d}"),
                "task": "gsm8k",
                "complexity": len(rec.get("steps") or []),
                "problem": rec["question"],
                "gold": str(rec["gold"]),
                "prompt": f"Q: {rec['question']}\n",
                "reference": "\n".join(rec.get("steps") or []) + "\n",
                "labels": rec.get("labels"),
                "split": "test" if i in test_ids else "train",
            }
        )
    return rows


def stats_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, complexity, split): traces, steps, incorrect and unparseable steps, accuracy."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["complexity"])].append(r)
        groups[(r["task"], "all")].append(r)
    table = []
    for (task, complexity), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]).zfill(4))
    ):
        steps = [s for r in rs for s in r["steps"]]
        incorrect = sum(s["label"] is False for s in steps)
        table.append(
            {
                "task": task,
                "complexity": complexity,
                "traces": len(rs),
                "steps": len(steps),
                "incorrect_steps": incorrect,
                "unparseable_steps": sum(not s["parsed"] for s in steps),
                "wellformed_rate": round(sum(s["parsed"] for s in steps) / max(len(steps), 1), 4),
                "traces_with_error": round(
                    sum(any(s["label"] is False for s in r["steps"]) for r in rs) / max(len(rs), 1),
                    4,
                ),
                "final_accuracy": round(
                    sum(bool(r["final_correct"]) for r in rs) / max(len(rs), 1), 4
                ),
            }
        )
    return table


def run_stage(ctx: StageContext[TracesConfig]) -> dict[str, Any]:
    """Generate, segment and label traces; save the dataset and return its stats table."""
    from datasets import Dataset

    from crv.generation import generate_greedy, token_cap
    from crv.io import atomic_write_json
    from crv.models.loading import load_subject
    from crv.tasks.label import label_steps
    from crv.tokens import last_token_index, token_char_ends

    cfg: TracesConfig = ctx.cfg
    model, tokenizer = load_subject(ctx.inputs["subject"], ctx.device)
    rows = _synthetic_rows(cfg, ctx.seed)
    if cfg.gsm8k_path:
        rows += _gsm8k_rows(cfg, ctx.seed)
    caps = {
        r["prompt"]: token_cap(tokenizer, r["reference"], cfg.max_new_tokens_factor) for r in rows
    }
    ctx.log.info("generating %d traces", len(rows))
    results = generate_greedy(
        model, tokenizer, [r["prompt"] for r in rows], caps.__getitem__, cfg.runtime_batch_size
    )

    out_rows = []
    for row, res in zip(rows, results, strict=True):
        steps, final, final_correct = label_steps(row, res.completion)
        char_ends = token_char_ends(tokenizer, res.completion_ids, res.completion)
        offset = len(res.prompt_ids)
        for s in steps:
            s["last_token"] = last_token_index(char_ends, s["end_char"], offset)
        out_rows.append(
            {
                "id": row["id"],
                "task": row["task"],
                "complexity": row["complexity"],
                "problem": row["problem"],
                "gold": row["gold"],
                "prompt": row["prompt"],
                "completion": res.completion,
                "input_ids": res.prompt_ids + res.completion_ids,
                "prompt_len": offset,
                "steps": steps,
                "final_answer": final,
                "final_correct": bool(final_correct),
                "split": row["split"],
            }
        )
    Dataset.from_list(out_rows).save_to_disk(str(ctx.out / "dataset"))
    table = stats_table(out_rows)
    atomic_write_json(ctx.out / "stats.json", table)
    for line in table:
        ctx.log.info("%s", line)
    return {"n_traces": len(out_rows), "table": table}
