"""Whole-step graphs, contrastive targets and the `crv.graphs.attribute` entry point.

A whole-step graph shares rows with the per-token graphs of its positions (the same rows,
computed once), and one of a one-position step is that position's graph. A contrastive
target is found where an incorrect step departs from the correct reduction with the
longest common prefix; its graph is built, stored and loaded beside the step graphs.
(Exactness of the contrastive edges: tests/test_graphs_attribute.py.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import random_transcoder_set, tiny_llama

import crv.graphs
from crv.graphs.attribute import TraceAttributor, step_positions
from crv.graphs.config import GraphsConfig, Position
from crv.graphs.graph import LOGIT
from crv.models.adapter import ArchAdapter

D, N_LAYERS, T = 32, 2, 24
CFG = GraphsConfig(max_logits=3, logit_cum_prob=1.0, max_feature_nodes=60, batch_size=8)
SPAN = (9, 10, 11, 12, 13)


@pytest.fixture(scope="module")
def subject() -> tuple[torch.nn.Module, Any, torch.Tensor]:
    torch.set_flush_denormal(True)
    model = tiny_llama(
        vocab_size=40, hidden_size=D, num_hidden_layers=N_LAYERS, initializer_range=0.15
    ).requires_grad_(False)
    tset = random_transcoder_set(D, 48, 4, range(N_LAYERS), seed=1)
    ids = torch.randint(1, 40, (T,), generator=torch.Generator().manual_seed(3))
    return model, tset, ids


def node_keys(att: Any) -> list[tuple[int, ...]]:
    cols = ("kind", "layer", "pos", "feature")
    return [tuple(int(att.nodes[c][j]) for c in cols) for j in range(att.counts.n_nodes)]


def rows_by_node(att: Any) -> dict[tuple[int, ...], dict[tuple[int, ...], float]]:
    """{target node: {source node: weight}} of an unpruned graph."""
    keys = node_keys(att)
    dense = att.adjacency_RN.numpy()
    return {
        keys[node]: dict(zip(keys, dense[r].tolist(), strict=True))
        for r, node in enumerate(att.counts.row_nodes.tolist())
    }


@pytest.mark.parametrize("position", [Position.step, Position.step_surprise])
def test_one_position_step_graph_is_that_positions_graph(subject, position: Position) -> None:
    model, tset, ids = subject
    adapter = ArchAdapter.for_model(model)
    cfg = GraphsConfig(**{**CFG.__dict__, "position": position})
    single = TraceAttributor(adapter, tset, ids, [12], CFG).attribute_step(12)
    whole = TraceAttributor(adapter, tset, ids, [(12,)], cfg).attribute_step((12,))
    for col in ("kind", "layer", "pos", "feature", "activation"):
        np.testing.assert_array_equal(whole.nodes[col], single.nodes[col])
    torch.testing.assert_close(whole.adjacency_RN, single.adjacency_RN, rtol=0, atol=0)
    assert whole.scores == single.scores
    g, h = whole.pruned(0.8, 0.98), single.pruned(0.8, 0.98)
    np.testing.assert_array_equal(g.src, h.src)
    np.testing.assert_array_equal(g.influence, h.influence)


def test_whole_step_graph_shares_the_per_token_rows(subject) -> None:
    model, tset, ids = subject
    adapter = ArchAdapter.for_model(model)
    per_token = TraceAttributor(adapter, tset, ids, list(SPAN), CFG)
    singles = per_token.attribute_steps(list(SPAN))
    whole_attributor = TraceAttributor(adapter, tset, ids, [SPAN], CFG)
    (whole,) = whole_attributor.attribute_steps([SPAN])

    # one logit node per (position, attributed token), each position's weights 1/n of its mass
    logit_pos = whole.nodes["pos"][whole.nodes["kind"] == LOGIT]
    assert sorted(set(logit_pos.tolist())) == list(SPAN)
    assert len(set(node_keys(whole))) == whole.counts.n_nodes  # node keys stay unique
    for p, single in zip(SPAN, singles, strict=True):
        at_p = torch.from_numpy(logit_pos == p)
        torch.testing.assert_close(whole.logit_probs[at_p], single.logit_probs)
        torch.testing.assert_close(whole.logit_weights[at_p], single.logit_probs / len(SPAN))
    tops = [s.scores["top_logit_prob"] for s in singles]
    entropies = [s.scores["logit_entropy"] for s in singles]
    assert whole.scores["top_logit_prob"] == pytest.approx(min(tops), rel=1e-6)
    assert whole.scores["logit_entropy"] == pytest.approx(max(entropies), rel=1e-6)

    # the same rows: every row both graphs have agrees on every source both have
    whole_rows = rows_by_node(whole)
    n_compared = 0
    for single in singles:
        for target, row in rows_by_node(single).items():
            if target in whole_rows:
                shared = row.keys() & whole_rows[target].keys()
                got = [whole_rows[target][k] for k in shared]
                np.testing.assert_allclose(got, [row[k] for k in shared], atol=1e-6, rtol=1e-5)
                n_compared += 1
    assert n_compared > len(SPAN) * CFG.max_logits  # logit rows and shared feature rows

    # far fewer rows than graphs of each token built alone, and one forward segment
    assert whole_attributor.n_rows_computed < per_token.n_rows_requested / 2
    assert len(whole_attributor.trace.ends) < len(per_token.trace.ends)


def test_surprise_weights_follow_the_written_tokens(subject) -> None:
    model, tset, ids = subject
    cfg = GraphsConfig(**{**CFG.__dict__, "position": Position.step_surprise})
    attributor = TraceAttributor(ArchAdapter.for_model(model), tset, ids, [SPAN], cfg)
    weights = attributor.position_weights(SPAN)
    written = [float(attributor.trace.probs(p)[int(ids[p + 1])]) for p in SPAN]
    np.testing.assert_allclose(weights, (1 - np.array(written)) / sum(1 - w for w in written))
    att = attributor.attribute_step(SPAN)
    pos = att.nodes["pos"][att.nodes["kind"] == LOGIT]
    for p, w in zip(SPAN, weights, strict=True):
        at_p = torch.from_numpy(pos == p)
        assert float(att.logit_weights[at_p].sum()) == pytest.approx(
            w * float(att.logit_probs[at_p].sum())
        )


def test_step_positions_of_whole_steps() -> None:
    steps = [{"last_token": 6}, {"last_token": 10}, {"last_token": 10}]
    assert step_positions(steps, 4, "step") == [(3, 4, 5), (6, 7, 8, 9), (10,)]
    assert step_positions(steps, 4, "step_surprise") == step_positions(steps, 4, "step")


def test_entry_point_is_the_attributors_graph(subject) -> None:
    model, tset, ids = subject
    adapter = ArchAdapter.for_model(model)
    with pytest.raises(TypeError):
        crv.graphs.attribute(model, tset, ids, 12)  # keyword-only options
    g = crv.graphs.attribute(model, tset, ids, position=12, max_feature_nodes=40, max_logits=3)
    cfg = GraphsConfig(max_feature_nodes=40, max_logits=3)
    h = TraceAttributor(adapter, tset, ids, [12], cfg).attribute_step(12).pruned(0.8, 0.98)
    for col in ("kind", "layer", "pos", "feature", "src", "dst", "weight"):
        np.testing.assert_array_equal(getattr(g, col), getattr(h, col))
    whole = crv.graphs.attribute(model, tset, ids, position=list(SPAN), max_feature_nodes=40)
    assert whole.explained == SPAN and whole.position == SPAN[-1]

    margin = crv.graphs.attribute(model, tset, ids, position=12, contrast="margin")
    top2 = torch.topk(TraceAttributor(adapter, tset, ids, [12], cfg).trace.probs(12), 2)
    (logit,) = np.flatnonzero(margin.kind == LOGIT)
    assert margin.feature[logit] == int(top2.indices[0])
    assert margin.activation[logit] == pytest.approx(float(top2.values[0]))
    with pytest.raises(ValueError, match="one position"):
        crv.graphs.attribute(model, tset, ids, position=[3, 4], contrast=(1, 2))


# -- contrastive targets of synthetic steps ----------------------------------------------


def synthetic_row(tokenizer: Any, expression: str, completion: str, i: int = 0) -> dict:
    """A traces row of an arithmetic problem with `completion`, tokenised as the traces
    stage does (prompt with bos, completion without)."""
    from crv.tasks import Problem
    from crv.tasks.expr import evaluate, value_text
    from crv.tasks.format import task_spec
    from crv.tasks.label import label_steps
    from crv.tokens import last_token_index, token_char_ends

    tree = Problem("p", "arithmetic", 3, expression, "").tree()
    gold = value_text(evaluate(tree, task_spec("arithmetic").lang))
    row = {"id": f"arithmetic-{i}", "task": "arithmetic", "complexity": 3}
    row |= {"problem": expression, "gold": gold, "label_mode": "strict", "split": "test"}
    steps, _, _ = label_steps(row, completion, planted=False)
    prompt_ids = tokenizer(f"Q: Evaluate {expression}\n")["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ends = token_char_ends(tokenizer, completion_ids, completion)
    for s in steps:
        s["last_token"] = last_token_index(ends, s["end_char"], len(prompt_ids))
    return row | {
        "completion": completion,
        "input_ids": prompt_ids + completion_ids,
        "prompt_len": len(prompt_ids),
        "steps": steps,
    }


WRONG_RESULT = "Step 1: 5+9=14, so 7*(14+7)\nStep 2: 14+7=21, so 7*21\nStep 3: 7*21=157, so 157\n"
WRONG_OPERAND = "Step 1: 3+4=7, so (1+2)*8\n"


def test_contrast_is_the_first_departure_from_the_closest_correct_step() -> None:
    from crv.graphs.contrastive import trace_contrasts
    from crv.models.tiny import build_tokenizer

    tok = build_tokenizer()
    row = synthetic_row(tok, "7*((5+9)+7)", WRONG_RESULT + "Answer: 157\n")
    (c,) = trace_contrasts(row, tok)
    assert c.step == 2 and c.correct_line == "Step 3: 7*21=147, so 147"
    assert tok.decode(row["input_ids"][c.position + 1]) == "5"  # 15|7 where 14|7 was right
    assert tok.decode(row["input_ids"][: c.position + 1]).endswith("Step 3: 7*21=1")
    assert (c.token, c.baseline) == (tok.convert_tokens_to_ids("5"), tok.convert_tokens_to_ids("4"))

    # two correct reductions: the one the model followed (3+4 first) is the reference
    row = synthetic_row(tok, "(1+2)*(3+4)", WRONG_OPERAND + "Answer: 24\n")
    (c,) = trace_contrasts(row, tok)
    assert c.correct_line == "Step 1: 3+4=7, so (1+2)*7"
    assert (tok.decode(c.token), tok.decode(c.baseline)) == ("8", "7")
    # a correct trace has none
    correct = "Step 1: 3+4=7, so (1+2)*7\nStep 2: 1+2=3, so 3*7\nStep 3: 3*7=21, so 21\n"
    assert trace_contrasts(synthetic_row(tok, "(1+2)*(3+4)", correct), tok) == []


def test_stage_stores_contrastive_graphs(tmp_path: Path) -> None:
    from datasets import Dataset

    from crv.graphs.contrastive import contrast_attributions, trace_contrasts
    from crv.graphs.stage import run_stage
    from crv.graphs.store import (
        ContrastiveGraphsError,
        iter_step_graphs,
        load_contrastive_graphs,
    )
    from crv.models.loading import load_subject
    from crv.models.tiny import build_tokenizer
    from crv.pipeline import StageContext
    from crv.transcoders.io import load_transcoder_set, save_transcoder_set

    tok = build_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=D, num_hidden_layers=N_LAYERS)
    model.save_pretrained(tmp_path / "subject")
    tok.save_pretrained(tmp_path / "subject")
    save_transcoder_set(
        random_transcoder_set(D, 48, 4, range(N_LAYERS), seed=1), tmp_path / "transcoders"
    )
    rows = [
        synthetic_row(tok, "7*((5+9)+7)", WRONG_RESULT + "Answer: 157\n", 0),
        synthetic_row(tok, "(1+2)*(3+4)", WRONG_OPERAND + "Answer: 24\n", 1),
        synthetic_row(tok, "(1+2)*(3+4)", "Step 1: 1+2=3, so 3*(3+4)\n", 2),
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "traces" / "dataset"))
    inputs = {k: tmp_path / k for k in ("subject", "traces", "transcoders")}

    def run(out: str, contrastive: bool) -> dict[str, Any]:
        cfg = GraphsConfig(max_feature_nodes=20, splits=["test"], contrastive=contrastive)
        (tmp_path / out).mkdir()
        ctx = StageContext(
            name="graphs",
            cfg=cfg,
            inputs=inputs,
            out=tmp_path / out,
            scratch=tmp_path / f"scratch-{out}",
            seed=0,
            device="cpu",
            log=logging.getLogger("test"),
        )
        return run_stage(ctx)

    metrics = run("with", contrastive=True)
    assert metrics["n_contrastive_graphs"] == 2 and metrics["n_graphs"] == 5
    (g,) = load_contrastive_graphs(tmp_path / "with", "arithmetic-0")
    assert g.step == 2 and g.n_edges > 0
    (logit,) = np.flatnonzero(g.kind == LOGIT)
    assert g.pos[logit] == g.position and tok.decode(int(g.feature[logit])) == "5"
    assert tok.decode(int(g.scores["contrast_baseline"])) == "4"
    assert load_contrastive_graphs(tmp_path / "with", "arithmetic-2") == []

    # the stored graph is the library's
    loaded, _ = load_subject(tmp_path / "subject")
    tset = load_transcoder_set(tmp_path / "transcoders")
    (c,) = trace_contrasts(rows[0], tok)
    adapter = ArchAdapter.for_model(loaded.requires_grad_(False))
    cfg = GraphsConfig(max_feature_nodes=20)
    attributor = TraceAttributor(adapter, tset, rows[0]["input_ids"], [c.position], cfg)
    (att,) = contrast_attributions(attributor, [c], "arithmetic-0")
    h = att.pruned(cfg.node_threshold, cfg.edge_threshold)
    np.testing.assert_array_equal(g.feature, h.feature)
    np.testing.assert_allclose(g.weight, h.weight, atol=1e-6)

    # the normal graphs do not depend on the switch; an artifact without it says so
    run("without", contrastive=False)
    for a, b in zip(
        iter_step_graphs(tmp_path / "with"), iter_step_graphs(tmp_path / "without"), strict=True
    ):
        np.testing.assert_array_equal(a.feature, b.feature)
        np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)
    with pytest.raises(ContrastiveGraphsError, match="graphs.contrastive=true"):
        load_contrastive_graphs(tmp_path / "without", "arithmetic-0")


def test_whole_step_graph_exports_with_unique_node_ids(subject) -> None:
    from crv.graphs.export import graph_json

    model, tset, ids = subject
    att = TraceAttributor(ArchAdapter.for_model(model), tset, ids, [SPAN], CFG).attribute_step(SPAN)
    logits = att.nodes["feature"][att.nodes["kind"] == LOGIT]
    doc = graph_json(
        att,
        [str(int(t)) for t in ids[: att.position + 1]],
        "prompt",
        [str(int(t)) for t in logits],
        "whole-step",
        "scan",
        N_LAYERS,
        0.8,
        0.98,
    )
    node_ids = [n["node_id"] for n in doc["nodes"]]
    assert len(node_ids) == len(set(node_ids))
    logit_nodes = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logit_nodes) == len(logits)  # logit nodes at every position, all kept
    assert {n["ctx_idx"] for n in logit_nodes} == set(SPAN)
    assert {link["target"] for link in doc["links"]} & {n["node_id"] for n in logit_nodes}
