"""The `traces` stage: the subject model's chains of thought, split into labelled steps.

For each problem the subject model greedily writes a completion (prompted as plain `Q:`
text or through its chat template, `crv.traces.prompts`; stop patterns end it with its
answer line); the completion is split into steps, each step is labelled by the task's exact
checker (synthetic tasks: `traces.labels` strict or semantic, `crv.tasks.label`) or by its
calculations (GSM8K format), and the token holding each step's last character is located in
the exact token sequence the model saw. A GSM8K-format record that carries its own chain of
thought is not generated: its steps are teacher-forced (prompt + its steps as the
completion) and keep their own labels. Steps after the first incorrect one are dropped, as
in CRV: once a chain has gone wrong, later steps are judged against a wrong premise. A step
the checker cannot parse is labelled incorrect and counted separately; a free-text step with
nothing to check is unlabelled (`label` None), left out of the benchmark and counted.
A step's `planted_rule` (the crv-tiny-bugs rule its reduction exercises, from the problem)
is filled only when the subject was trained with the planted rules; for any other subject
it is empty, so no later stage reads planted errors into a model that has none.

Generation runs through `crv.executor`, one item per generation batch (the batches
`generate_greedy` forms, so a batch decodes the same tokens alone as among the others):
in this process or sharded over Ray workers, each batch's results written to the scratch
directory, so a killed run resumes with the batches it has not finished.

The artifact is a `datasets.Dataset` (`save_to_disk`) with one row per problem; columns are
listed in docs/architecture.md. Train/test split is by problem (`make_splits`), so no
problem's steps appear in both.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crv.pipeline import StageContext
from crv.tables import markdown_table
from crv.traces.config import TracesConfig

log = logging.getLogger("crv.traces")

PromptFn = Callable[[str, str, list[tuple[str, str]]], str]
"""`(task, problem, few-shot examples) -> prompt text`."""


def few_shot_examples(task: str, k: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """`k` solved 3-operator problems `(expression, canonical solution)`, none in `exclude`."""
    from crv.tasks import generate_problems

    pool = generate_problems(task, 3, 50 * k, seed=10_000 + seed, unique=True)
    return [(p.expression, p.solution()) for p in pool if p.expression not in exclude][:k]


def _synthetic_rows(cfg: TracesConfig, seed: int, prompt: PromptFn) -> list[dict[str, Any]]:
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
        shots = few_shot_examples(task, cfg.few_shot, seed, used) if cfg.few_shot else []
        for split, problems in (("train", train), ("test", test)):
            for p in problems:
                rows.append(
                    {
                        "id": p.id,
                        "task": task,
                        "complexity": p.complexity,
                        "problem": p.expression,
                        "gold": p.gold,
                        "prompt": prompt(task, p.expression, shots),
                        "reference": p.solution(),
                        "given": None,
                        "split": split,
                    }
                )
    return rows


def _gsm8k_rows(cfg: TracesConfig, seed: int, prompt: PromptFn) -> list[dict[str, Any]]:
    """GSM8K-format rows; a record with its own chain of thought carries it as `given`
    (steps and labels), to be teacher-forced instead of generated."""
    import random

    from crv.tasks.gsm8k import load_gsm8k

    records = load_gsm8k(cfg.gsm8k_path, limit=cfg.gsm8k_limit)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(cfg.test_frac * len(records))
    test_ids = set(order[:n_test])
    rows = []
    for i, rec in enumerate(records):
        steps = rec.get("steps") or []
        rows.append(
            {
                "id": str(rec.get("id") or f"gsm8k-{i:06d}"),
                "task": "gsm8k",
                "complexity": len(steps),
                "problem": rec["question"],
                "gold": str(rec["gold"]),
                "prompt": prompt("gsm8k", rec["question"], []),
                "reference": "\n".join(steps) + "\n",
                "given": {"steps": steps, "labels": rec.get("labels")}
                if rec.get("given")
                else None,
                "split": "test" if i in test_ids else "train",
            }
        )
    return rows


def given_completion(
    given: dict[str, Any], gold: str
) -> tuple[str, list[dict[str, Any]], str, bool]:
    """A record's own chain of thought as a completion (its steps one per line, then
    `#### <gold>`), with its step dicts: the record's labels, or, where it has none, each
    step's calculations checked (`crv.tasks.gsm8k.step_label`). Returns the completion,
    the steps, the final answer and its correctness (the gold, so True)."""
    from crv.tasks.gsm8k import FINAL_MARKER, free_text_step, step_label

    completion, steps = "", []
    labels = given["labels"] or [None] * len(given["steps"])
    for index, (text, label) in enumerate(zip(given["steps"], labels, strict=True)):
        span = (len(completion), len(completion) + len(text))
        completion += text + "\n"
        if given["labels"] is None:
            label = step_label(text)
        reason = "given" if given["labels"] is not None else "calculations"
        steps.append(free_text_step(index, completion, span, label, reason))
    return completion + f"{FINAL_MARKER} {gold}\n", steps, gold, True


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
        unlabelled = sum(s["label"] is None for s in steps)
        table.append(
            {
                "task": task,
                "complexity": complexity,
                "traces": len(rs),
                "steps": len(steps),
                "incorrect_steps": incorrect,
                "unparseable_steps": sum(not s["parsed"] for s in steps),
                "unlabelled_steps": unlabelled,
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


GENERATION_DIR = "generations"
"""Scratch folder of the finished generation batches, one JSON file each."""


def generate_batches(
    subject_dir: Path,
    device: str,
    stop: Sequence[str],
    add_special_tokens: bool,
    batches: list[tuple[list[dict[str, Any]], Path]],
) -> None:
    """Load the subject once, then greedily decode each batch of `{id, prompt, cap}` and
    write its results (`GenerationResult` fields by trace id) to the batch's JSON file: the
    work of one executor shard."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from crv.generation import generate_greedy
    from crv.io import atomic_write_json
    from crv.models.loading import load_subject

    model, tokenizer = load_subject(subject_dir, device)
    # moves per finished prompt: a real model's batch takes minutes
    bar = tqdm(total=sum(len(b) for b, _ in batches), desc="generate", unit="prompt")
    for batch, file in batches:
        caps = {r["prompt"]: r["cap"] for r in batch}
        generated = generate_greedy(
            model,
            tokenizer,
            [r["prompt"] for r in batch],
            caps.__getitem__,
            len(batch),
            progress=False,
            stop_patterns=stop,
            add_special_tokens=add_special_tokens,
            on_done=bar.update,
        )
        atomic_write_json(
            file,
            {r["id"]: asdict(g) for r, g in zip(batch, generated, strict=True)},
        )
    bar.close()


def run_stage(ctx: StageContext[TracesConfig]) -> dict[str, Any]:
    """Generate (or teacher-force), segment and label traces; save the dataset and return
    its stats table."""
    import functools
    import time

    from datasets import Dataset

    from crv.executor import run_sharded
    from crv.generation import GenerationResult, greedy_batches, token_cap
    from crv.io import atomic_write_json, read_json
    from crv.models.loading import load_subject_tokenizer
    from crv.subject.sources import trained_with_planted_rules
    from crv.tasks.label import judge_for, label_steps
    from crv.tokens import last_token_index, token_char_ends
    from crv.traces.prompts import build_prompt, resolve_style

    cfg: TracesConfig = ctx.cfg
    judge_for(cfg.labels)  # an unknown label mode fails before the model loads
    tokenizer = load_subject_tokenizer(ctx.inputs["subject"])
    planted = trained_with_planted_rules(ctx.inputs["subject"])
    style = resolve_style(cfg.prompt_style, tokenizer)
    prompt = functools.partial(build_prompt, tokenizer, style)
    rows = _synthetic_rows(cfg, ctx.seed, prompt)
    if cfg.gsm8k_path:
        rows += _gsm8k_rows(cfg, ctx.seed, prompt)
    add_special = style == "plain"  # a rendered chat template holds its special tokens
    todo = [r for r in rows if r["given"] is None]
    caps = [token_cap(tokenizer, r["reference"], cfg.max_new_tokens_factor) for r in todo]
    ctx.log.info(
        "generating %d traces (%s prompts, %s labels); %d given traces teacher-forced",
        len(todo),
        style,
        cfg.labels,
        len(rows) - len(todo),
    )
    lengths = [
        len(tokenizer(r["prompt"], add_special_tokens=add_special)["input_ids"]) for r in todo
    ]
    batches = [
        [{"id": todo[i]["id"], "prompt": todo[i]["prompt"], "cap": caps[i]} for i in batch]
        for batch in greedy_batches(lengths, caps, cfg.runtime_batch_size)
    ]
    files = [ctx.scratch / GENERATION_DIR / f"{b:06d}.json" for b in range(len(batches))]
    work = functools.partial(
        generate_batches, ctx.inputs["subject"], ctx.device, cfg.stop, add_special
    )
    started = time.perf_counter()
    n_resumed = run_sharded(
        batches, files, work, ctx.runtime, ctx.device, "generation batches", ctx.log
    )
    seconds = time.perf_counter() - started
    results = {
        trace_id: GenerationResult(**res) for f in files for trace_id, res in read_json(f).items()
    }

    out_rows = []
    for row in rows:
        row = {**row, "label_mode": cfg.labels}
        if row["given"] is None:
            res = results[row["id"]]
            prompt_ids, completion_ids, completion = (
                res.prompt_ids,
                res.completion_ids,
                res.completion,
            )
            steps, final, final_correct = label_steps(row, completion, planted)
        else:
            completion, steps, final, final_correct = given_completion(row["given"], row["gold"])
            prompt_ids = tokenizer(row["prompt"], add_special_tokens=add_special)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        char_ends = token_char_ends(tokenizer, completion_ids, completion)
        offset = len(prompt_ids)
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
                "completion": completion,
                "input_ids": prompt_ids + completion_ids,
                "prompt_len": offset,
                "steps": steps,
                "final_answer": final,
                "final_correct": bool(final_correct),
                "label_mode": cfg.labels,
                "teacher_forced": row["given"] is not None,
                "split": row["split"],
            }
        )
    Dataset.from_list(out_rows).save_to_disk(str(ctx.out / "dataset"))
    table = stats_table(out_rows)
    atomic_write_json(ctx.out / "stats.json", table)
    for line in table:
        ctx.log.info("%s", line)
    per_trace = seconds / max(len(todo), 1)
    ctx.log.info("generation: %.1f s, %.2f s per generated trace", seconds, per_trace)
    return {
        "n_traces": len(out_rows),
        "prompt_style": style,
        "labels": cfg.labels,
        "generation_seconds": round(seconds, 1),
        "n_resumed_batches": n_resumed,
        "seconds_per_trace": round(per_trace, 2),
        "table": table,
    }


def traces_markdown(section: dict[str, Any]) -> str:
    """The report.md section of a `traces` result: its per-task table."""
    return markdown_table(section.get("table", []))
