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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("crv.traces")


@dataclass
class TracesConfig:
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "boolean"])
    """Synthetic tasks to generate problems for: arithmetic, boolean."""
    complexities: list[int] = field(default_factory=lambda: [3, 5, 7, 10])
    """Numbers of operators per problem."""
    n_per_complexity: int = 200
    """Distinct problems per task and complexity (train + test)."""
    test_frac: float = 0.2
    """Share of problems in the test split (split by problem, never by step)."""
    n_test_per_complexity: dict[str, int] = field(default_factory=dict)
    """Test problems per complexity for the tasks named here, instead of test_frac's share
    (their training problems stay as many): a task whose errors are rare needs more test
    problems for narrow intervals, not a bigger training set."""
    gsm8k_path: str | None = None
    """Optional GSM8K-format file (JSONL/Parquet, question + answer with ####) to add as task gsm8k."""
    gsm8k_limit: int | None = None
    """Read at most this many GSM8K records."""
    few_shot: int = 0
    """Solved examples in the canonical format prepended to each prompt (for pretrained chat models)."""
    max_new_tokens_factor: float = 1.5
    """Token cap per problem = factor x tokens of its canonical solution + 16 (stops runaways)."""
    runtime_batch_size: int = 64
    """Prompts per generation batch (memory only; not part of the cache key)."""


def load_traces(path: str | Path):
    """The traces dataset of a `traces` artifact."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "dataset"))


def token_char_ends(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """For each token of `ids` (which decode to `text`), the offset just past its last character.

    Decoding token by token is exact for tokenizers whose pieces concatenate (crv-tiny, most
    BPE vocabularies on ASCII); when pieces do not add up to `text`, fall back to decoding
    growing prefixes, which is slower but always consistent with `text`.
    """
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) == text:
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
        return ends
    return [
        len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)) for i in range(len(ids))
    ]


def last_token_index(char_ends: Sequence[int], end_char: int, offset: int) -> int:
    """Index (into prompt+completion ids) of the token holding character `end_char - 1`."""
    for i, end in enumerate(char_ends):
        if end >= end_char:
            return offset + i
    return offset + len(char_ends) - 1


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


def label_steps(
    row: dict[str, Any], completion: str
) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Steps (index, text, label, parsed, start_char, end_char), final answer, its correctness."""
    if row["task"] == "gsm8k":
        from crv.tasks.segment import GENERIC_STEP_PATTERN, segment_steps

        spans = segment_steps(completion, GENERIC_STEP_PATTERN)
        labels = row.get("labels") or [None] * len(spans)
        steps = [
            {
                "index": i,
                "text": completion[s:e],
                "label": labels[i] if i < len(labels) else None,
                "parsed": True,
                "start_char": s,
                "end_char": e,
            }
            for i, (s, e) in enumerate(spans)
        ]
        final = completion.rsplit("####", 1)[-1].strip() if "####" in completion else None
        return steps, final, final == row["gold"]

    from crv.tasks import Problem
    from crv.tasks.checker import check_completion

    problem = Problem(row["id"], row["task"], row["complexity"], row["problem"], row["gold"])
    checked = check_completion(problem, completion)
    steps = [
        {
            "index": s.index,
            "text": s.text,
            "label": s.label,
            "parsed": s.parsed,
            "start_char": s.start_char,
            "end_char": s.end_char,
        }
        for s in checked.steps
    ]
    return steps, checked.final_answer, checked.final_correct


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


def run_stage(ctx) -> dict[str, Any]:
    """Generate, segment and label traces; save the dataset and return its stats table."""
    from datasets import Dataset

    from crv.generation import generate_greedy, token_cap
    from crv.io import atomic_write_json
    from crv.models.loading import load_subject

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
