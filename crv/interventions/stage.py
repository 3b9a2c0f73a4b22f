"""The `interventions` stage: propose, apply and measure interventions on flagged steps.

Flagged steps are the labelled steps of the configured split (tasks with a programmatic
checker only) whose verifier score reaches the verifier's threshold. Incorrect ones (true
alarms) get the no-intervention regeneration, N proposals, N random and N margin-matched
controls (one batch per step), and the second-choice regeneration; correct ones (false
alarms) the same with N = 1. Each step is attempted on its own (`crv.executor`: in this
process or sharded over Ray workers), its attempt written to the stage's scratch directory
so that a killed run resumes with the steps it has not finished. Every attempt goes to
`interventions.json`; the returned dict is the report section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from crv.graphs.graph import StepGraph
from crv.interventions.apply import (
    Outcome,
    SecondChoice,
    StepSpan,
    active_features,
    margin_drops,
    regenerate_batch,
    regenerate_second_choices,
    step_span,
)
from crv.interventions.config import InterventionsConfig
from crv.interventions.measure import StepAttempt, summarize
from crv.interventions.propose import (
    Proposal,
    margin_matched_control,
    propose,
    random_control,
    step_rng,
)
from crv.io import atomic_write_json, read_json
from crv.pipeline import StageContext
from crv.tasks import TASKS, Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from crv.models.adapter import ArchAdapter
    from crv.transcoders.module import TranscoderSet
    from crv.verifier.classifier import XGBVerifier

RESULTS_FILE = "interventions.json"


def load_verifiers(verifier_dir: Path, tasks: list[str], which: str) -> dict[str, XGBVerifier]:
    """The verifier scoring each task's steps (`which`: "task" or "pooled"); a task for
    which none was saved (its training steps held one class) is left out."""
    from crv.verifier.classifier import load_verifier

    out = {}
    for task in tasks:
        try:
            out[task] = load_verifier(verifier_dir, task if which == "task" else None)
        except FileNotFoundError:
            continue
    return out


def score_steps(table: pd.DataFrame, verifiers: dict[str, XGBVerifier], split: str) -> pd.DataFrame:
    """Labelled steps of `split` with their verifier `score` and `flagged` (the score
    reaches the threshold of their task's verifier); tasks without a verifier are left out."""
    steps = table[(table["split"] == split) & (table["label"] >= 0)]
    parts = [steps.iloc[:0].assign(score=np.zeros(0), flagged=np.zeros(0, bool))]
    for task, rows in steps.groupby("task", sort=True):
        if task in verifiers:
            scored = rows.assign(score=verifiers[task].predict_proba(rows))
            parts.append(scored.assign(flagged=scored["score"] >= verifiers[task].threshold))
    return pd.concat(parts).sort_values("step_id", kind="stable").reset_index(drop=True)


def flag_steps(table: pd.DataFrame, verifiers: dict[str, XGBVerifier], split: str) -> pd.DataFrame:
    """The steps of `score_steps` that are flagged, with their `score`."""
    scored = score_steps(table, verifiers, split)
    return scored[scored["flagged"]].drop(columns="flagged").reset_index(drop=True)


def sample_steps(steps: pd.DataFrame, cap: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most `cap` rows, a uniform sample when there are more, in step_id order."""
    if len(steps) > cap:
        steps = steps.iloc[np.sort(rng.choice(len(steps), size=cap, replace=False))]
    return steps


def graph_scorer(
    features_dir: Path, verifiers: dict[str, XGBVerifier], n_layers: int, seed: int
) -> Callable[[str, StepGraph], float]:
    """(task, graph) -> the task verifier's score of the graph's features, computed as the
    features stage computed them (with the settings of the `features` artifact)."""
    from crv.features.compute import graph_features
    from crv.features.table import load_features_config

    feat_cfg = load_features_config(features_dir)

    def score(task: str, graph: StepGraph) -> float:
        row = pd.DataFrame([graph_features(graph, n_layers, feat_cfg, seed)])
        return float(verifiers[task].predict_proba(row)[0])

    return score


def attempt_step(
    adapter: ArchAdapter,
    tset: TranscoderSet,
    tokenizer: PreTrainedTokenizerBase,
    row: dict[str, Any],
    flagged: Mapping[str, Any],
    graph: StepGraph,
    cfg: InterventionsConfig,
    seed: int,
    score_graph: Callable[[StepGraph], float] | None,
    pair: tuple[int, int] | None = None,
) -> StepAttempt:
    """Everything tried on one step (`flagged`: its `step_id`, `step`, `label`, verifier
    `score` and optionally `sampled`, default True): the feature-edit regenerations as one
    batch, then the second-choice regeneration. With `pair` = (wrong, correct) token ids,
    `graph` is the step's contrastive graph and margins are logit(wrong) - logit(correct)
    at its position."""
    step = row["steps"][int(flagged["step"])]
    span = step_span(row, step, tokenizer)
    window = span.window(graph.position)
    active = active_features(adapter, tset, row["input_ids"], window)
    incorrect = int(flagged["label"]) == 1
    n = cfg.n_proposals if incorrect else 1

    def drops(proposals: list[Proposal]) -> list[float]:
        return margin_drops(adapter, tset, row["input_ids"], graph.position, proposals, pair)

    choice = (cfg.rank_by, cfg.action, cfg.amplify_scale, cfg.scope)
    proposals = propose(graph, window, active, n, *choice, score_graph, cfg.candidate_pool, drops)
    rng = step_rng(seed, flagged["step_id"])
    controls = random_control(proposals, active, rng)
    pool = propose(graph, window, active, cfg.candidate_pool, "influence", *choice[1:])
    matched = margin_matched_control(pool, proposals, active, n, rng, drops)
    problem = Problem(row["id"], row["task"], row["complexity"], row["problem"], row["gold"])
    canonical = len(tokenizer(problem.solution(), add_special_tokens=False)["input_ids"])
    budget = max(len(row["input_ids"]) - span.first_token, canonical) + cfg.extra_new_tokens

    # every feature edit of the step as one batch, one intervention per row
    todo = [None, *proposals, *controls, *matched]
    ranks = [-1, *range(len(proposals)), *range(len(controls)), *range(len(matched))]
    outcomes = regenerate_batch(
        adapter, tset, tokenizer, row, step["index"], span, budget, todo, ranks
    )
    by_condition: dict[str, list[Outcome]] = {}
    for outcome in outcomes[1:]:
        by_condition.setdefault(outcome.condition, []).append(outcome)
    attempt = StepAttempt(
        step_id=flagged["step_id"],
        trace_id=row["id"],
        step=int(step["index"]),
        task=row["task"],
        incorrect=incorrect,
        score=float(flagged["score"]),
        original_text=step["text"],
        original_final_correct=bool(row["final_correct"]),
        span=span,
        proposals=proposals,
        controls=controls,
        none=outcomes[0],
        graph=by_condition.get("graph", []),
        random=by_condition.get("random", []),
        margin_matched=by_condition.get("margin_matched", []),
        planted_rule=str(step.get("planted_rule") or ""),
        sampled=bool(flagged.get("sampled", True)),
        graph_kind="step" if pair is None else "contrastive",
    )
    second = SecondChoice(row, step["index"], span, graph.position, budget)
    attempt.second_choice = [
        o for o in regenerate_second_choices(adapter, tokenizer, [second]) if o
    ]
    return attempt


def contrastive_graph(
    graphs_dir: Path, trace_id: str, step: int
) -> tuple[StepGraph, tuple[int, int]] | None:
    """The contrastive graph of a step and its (wrong, correct) token ids; None when the
    step has none (correct, no correct counterpart, or graphs built without them)."""
    from crv.graphs.store import ContrastiveGraphsError, load_contrastive_graphs

    try:
        graphs = load_contrastive_graphs(graphs_dir, trace_id)
    except ContrastiveGraphsError:
        return None
    for g in graphs:
        if g.step == step:
            return g, (int(g.scores["contrast_token"]), int(g.scores["contrast_baseline"]))
    return None


def attempt_from_dict(d: Mapping[str, Any]) -> StepAttempt:
    """The attempt `StepAttempt.to_dict` gave (a proposal or control is the proposal of
    its outcome)."""
    outcomes = [Outcome.from_dict(o) for o in d["outcomes"]]

    def of(condition: str) -> list[Outcome]:
        return [o for o in outcomes if o.condition == condition]

    graph, random = of("graph"), of("random")
    return StepAttempt(
        step_id=d["step_id"],
        trace_id=d["trace_id"],
        step=d["step"],
        task=d["task"],
        incorrect=d["incorrect"],
        score=d["score"],
        original_text=d["original_text"],
        original_final_correct=d["original_final_correct"],
        span=StepSpan(d["first_token"], d["last_token"]),
        proposals=[o.proposal for o in graph if o.proposal],
        controls=[o.proposal for o in random if o.proposal],
        none=of("none")[0],
        graph=graph,
        random=random,
        margin_matched=of("margin_matched"),
        second_choice=of("second_choice"),
        planted_rule=d["planted_rule"],
        sampled=d["sampled"],
        graph_kind=d["graph_kind"],
    )


def attempt_steps(
    inputs: Mapping[str, Path],
    cfg: InterventionsConfig,
    seed: int,
    device: str,
    items: list[tuple[dict[str, Any], Path]],
) -> None:
    """The work of one executor shard: load the subject with its transcoders (and the
    verifiers, to rank by them) once, then write each flagged step's attempt
    (`attempt_step`) to its file as JSON."""
    from crv.graphs.store import load_step_graphs
    from crv.traces.store import load_traces
    from crv.transcoders.io import load_subject_with_transcoders

    loaded = load_subject_with_transcoders(inputs["subject"], inputs["transcoders"], device)
    tokenizer, adapter, tset = loaded.tokenizer, loaded.adapter, loaded.transcoders
    scorer = None
    if cfg.rank_by == "verifier":
        verifiers = load_verifiers(inputs["verifier"], sorted(TASKS), cfg.verifier)
        scorer = graph_scorer(inputs["features"], verifiers, adapter.n_layers, seed)
    traces = load_traces(inputs["traces"])
    row_of = {tid: i for i, tid in enumerate(traces["id"])}
    for flag, file in tqdm(items, desc="interventions", unit="step"):
        row = traces[row_of[flag["trace_id"]]]
        graph = next(
            g
            for g in load_step_graphs(inputs["graphs"], flag["trace_id"])
            if g.step == flag["step"]
        )
        pair = None
        if cfg.graph == "contrastive" and flag["label"] == 1:
            found = contrastive_graph(inputs["graphs"], flag["trace_id"], flag["step"])
            if found is not None:
                graph, pair = found
        score_graph = (lambda g, task=row["task"]: scorer(task, g)) if scorer else None
        attempt = attempt_step(
            adapter, tset, tokenizer, row, flag, graph, cfg, seed, score_graph, pair
        )
        atomic_write_json(file, attempt.to_dict())


def run_stage(ctx: StageContext[InterventionsConfig]) -> dict[str, Any]:
    """Intervene on a sample of flagged steps; write every attempt; return the rates. The
    steps are attempted by `crv.executor` (in this process, or sharded over Ray workers
    with one model replica each), one result file per step in the scratch directory: every
    step's attempt depends only on the step, the config and the seed."""
    from urllib.parse import quote

    from crv.executor import run_sharded
    from crv.features.table import load_feature_table

    cfg = ctx.cfg
    verifiers = load_verifiers(ctx.inputs["verifier"], sorted(TASKS), cfg.verifier)
    scored = score_steps(load_feature_table(ctx.inputs["features"]), verifiers, cfg.split)
    flagged = scored[scored["flagged"]]
    wrong, right = flagged[flagged["label"] == 1], flagged[flagged["label"] == 0]
    rng = np.random.default_rng(ctx.seed)
    parts = [
        sample_steps(wrong, cfg.max_steps, rng),
        sample_steps(right, cfg.max_correct_steps, rng),
    ]
    chosen = pd.concat(parts).assign(sampled=True)
    if cfg.planted_steps == "all":
        extra = scored[(scored["label"] == 1) & (scored["planted_rule"].fillna("") != "")]
        extra = extra[~extra["step_id"].isin(chosen["step_id"])]
        extra = sample_steps(extra, cfg.max_planted_steps, rng).assign(sampled=False)
        chosen = pd.concat([chosen, extra])
    ctx.log.info(
        "interventions: %d flagged incorrect, %d false alarms; attempting %d steps",
        len(wrong),
        len(right),
        len(chosen),
    )
    items = [
        {"step_id": f.step_id, "trace_id": f.trace_id, "step": int(f.step)}
        | {"label": int(f.label), "score": float(f.score), "sampled": bool(f.sampled)}
        for f in chosen.itertuples(index=False)
    ]
    files = [ctx.scratch / "attempts" / f"{quote(it['step_id'], safe='')}.json" for it in items]
    work = partial(attempt_steps, dict(ctx.inputs), cfg, ctx.seed, ctx.device)
    n_resumed = run_sharded(items, files, work, ctx.runtime, ctx.device, "flagged steps", ctx.log)
    attempts = [attempt_from_dict(read_json(f)) for f in files]
    atomic_write_json(
        ctx.out / RESULTS_FILE,
        {"config": dataclasses.asdict(cfg), "attempts": [a.to_dict() for a in attempts]},
    )
    result = summarize(attempts, len(wrong), len(right), cfg.n_examples, cfg.n_bootstrap, ctx.seed)
    settings = {
        k: getattr(cfg, k)
        for k in ("rank_by", "action", "scope", "n_proposals", "verifier", "graph", "planted_steps")
    }
    return {**settings, **result, "n_resumed_steps": n_resumed}
