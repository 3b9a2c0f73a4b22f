"""Interventions: exact no-op regeneration, local feature edits, deterministic proposals,
the random, margin-matched and second-choice controls, and the rates with their intervals."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from factories import random_transcoder_set

from crv.generation import generate_greedy
from crv.graphs.graph import FEATURE, LOGIT, TOKEN, StepGraph
from crv.interventions.apply import (
    Outcome,
    SecondChoice,
    StepSpan,
    active_features,
    margin_drops,
    regenerate_batch,
    regenerate_second_choices,
    second_choice_token,
    step_span,
    to_intervention,
)
from crv.interventions.config import InterventionsConfig
from crv.interventions.measure import (
    StepAttempt,
    interventions_markdown,
    paired_bootstrap_diff,
    summarize,
    wilson_interval,
)
from crv.interventions.propose import (
    Proposal,
    drop_nodes,
    margin_matched_control,
    propose,
    random_control,
    rank_candidates,
    step_rng,
)
from crv.models.adapter import ArchAdapter
from crv.models.tiny import TinyConfig, build_model, build_tokenizer
from crv.tasks import Problem
from crv.transcoders.splice import splice

N_LAYERS, D_MODEL = 3, 32
PROMPT = "Q: Evaluate 7*((5+9)+7)\n"


@pytest.fixture(scope="module")
def subject():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend on a shared machine
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    cfg = TinyConfig(layers=N_LAYERS, hidden=D_MODEL, heads=2, intermediate=64, seed=0)
    model = build_model(cfg, tokenizer).eval()
    tset = random_transcoder_set(D_MODEL, 128, 8, range(N_LAYERS))
    yield ArchAdapter.for_model(model), tokenizer, tset
    torch.set_num_threads(threads)


def _row(prompt_ids: list[int], completion_ids: list[int], completion: str) -> dict:
    return {
        "id": "arithmetic-n3-000000",
        "task": "arithmetic",
        "complexity": 3,
        "problem": "7*((5+9)+7)",
        "gold": "147",
        "prompt_len": len(prompt_ids),
        "input_ids": prompt_ids + completion_ids,
        "completion": completion,
    }


def test_no_intervention_regeneration_reproduces_the_original(subject):
    adapter, tokenizer, tset = subject
    [res] = generate_greedy(adapter.model, tokenizer, [PROMPT], 40)
    row = _row(res.prompt_ids, res.completion_ids, res.completion)
    offset = len(res.prompt_ids)
    for cut in (1, 17):
        span = StepSpan(offset + cut, offset + cut + 5)
        n_new = len(res.completion_ids) - cut
        [out] = regenerate_batch(adapter, tset, tokenizer, row, 0, span, n_new, [None], [-1])
        assert out.condition == "none" and out.proposal is None and not out.changed
        assert out.regenerated == tokenizer.decode(
            res.completion_ids[cut:], skip_special_tokens=True
        )


def test_step_span_finds_the_step_tokens(subject):
    _, tokenizer, _ = subject
    problem = Problem("p", "arithmetic", 3, "7*((5+9)+7)", "147")
    completion = problem.solution()
    prompt_ids = tokenizer(problem.prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    row = _row(prompt_ids, completion_ids, completion)
    start = completion.index("Step 2")
    end = completion.index("\n", start)
    ids = row["input_ids"]
    last = (
        len(prompt_ids)
        + len(tokenizer(completion[:end], add_special_tokens=False)["input_ids"])
        - 1
    )
    span = step_span(row, {"start_char": start, "end_char": end, "last_token": last}, tokenizer)
    assert tokenizer.decode(ids[span.first_token : span.last_token + 1]) == completion[start:end]
    assert span.window(last) == (span.first_token - 1, last - 1)
    assert span.window(span.first_token - 3) == (span.first_token - 3, last - 1)


def _mlp_outputs(adapter, tset, ids, interventions=()):
    """Per-layer spliced MLP outputs and splice records of one forward pass."""
    outs: dict[int, torch.Tensor] = {}
    with splice(adapter, tset, add_error=True, interventions=interventions, record=True) as h:
        hooks = [
            adapter.mlp(layer).register_forward_hook(
                lambda _m, _i, y, layer=layer: outs.__setitem__(layer, y.detach().clone())
            )
            for layer in range(N_LAYERS)
        ]
        with torch.no_grad():
            adapter.model(input_ids=ids, use_cache=False)
        for hook in hooks:
            hook.remove()
    return outs, {layer: recs[0] for layer, recs in h.records.items()}


def test_suppressing_a_feature_changes_only_it_and_nothing_upstream(subject):
    adapter, tokenizer, tset = subject
    ids = torch.tensor([tokenizer(PROMPT + "Step 1: 5+9=14, so 7*(14+7)\n")["input_ids"]])
    window = (12, 20)
    active = active_features(adapter, tset, ids[0].tolist(), window)
    layer = 1
    (layer, feature), positions = next((k, p) for k, p in active.items() if k[0] == layer)
    proposal = Proposal(layer, feature, "suppress", 0.0, "step", window[0], positions, 1.0, "graph")
    clean_out, clean_rec = _mlp_outputs(adapter, tset, ids)
    edit_out, edit_rec = _mlp_outputs(adapter, tset, ids, [to_intervention(proposal, ids.shape[1])])

    first = min(positions)
    for lay in range(N_LAYERS):
        upto = (
            ids.shape[1] if lay <= layer else first
        )  # upstream: earlier layers, earlier positions
        assert torch.equal(clean_rec[lay].idx_BTK[:, :upto], edit_rec[lay].idx_BTK[:, :upto])
        assert torch.equal(clean_rec[lay].acts_BTK[:, :upto], edit_rec[lay].acts_BTK[:, :upto])
        if lay < layer:
            assert torch.equal(clean_out[lay], edit_out[lay])
    # at the edited layer the output moves by exactly -a * W_dec[f] at the chosen positions
    acts, idx = clean_rec[layer].acts_BTK[0], clean_rec[layer].idx_BTK[0]
    a_T = (acts * (idx == feature)).sum(-1)
    expected = torch.zeros_like(clean_out[layer][0])
    expected[list(positions)] = -a_T[list(positions), None] * tset[layer].W_dec[feature].detach()
    assert a_T[list(positions)].gt(0).all()
    torch.testing.assert_close(
        edit_out[layer][0] - clean_out[layer][0], expected, atol=1e-5, rtol=0
    )
    # and it does reach the layers downstream
    assert not torch.equal(clean_out[N_LAYERS - 1], edit_out[N_LAYERS - 1])


def test_batched_regenerations_equal_one_at_a_time(subject):
    adapter, tokenizer, tset = subject
    [res] = generate_greedy(adapter.model, tokenizer, [PROMPT], 30)
    row = _row(res.prompt_ids, res.completion_ids, res.completion)
    span = StepSpan(len(res.prompt_ids) + 3, len(res.prompt_ids) + 8)
    window = span.window(span.last_token)
    active = active_features(adapter, tset, row["input_ids"], window)
    todo = [None] + [
        Proposal(layer, feature, "amplify", 8.0, "onward", window[0], (), 0.0, "graph")
        for layer, feature in list(active)[:4]
    ]
    ranks = [-1, 0, 1, 2, 3]
    batched = regenerate_batch(adapter, tset, tokenizer, row, 0, span, 27, todo, ranks)
    alone = [
        regenerate_batch(adapter, tset, tokenizer, row, 0, span, 27, [p], [r])[0]
        for p, r in zip(todo, ranks, strict=True)
    ]
    assert [o.to_dict() for o in batched] == [o.to_dict() for o in alone]
    assert [(o.condition, o.rank) for o in batched] == [("none", -1)] + [
        ("graph", r) for r in ranks[1:]
    ]
    assert all(
        isinstance(o.step_correct, bool) and isinstance(o.final_correct, bool) for o in batched
    )
    assert not batched[0].changed and any(o.changed for o in batched[1:])


def _graph(seed: int = 0) -> StepGraph:
    """A hand-made graph: 12 feature nodes over 3 layers and positions 8..12, 2 tokens, 2 logits."""
    rng = np.random.default_rng(seed)
    n_feat = 12
    kind = np.array([FEATURE] * n_feat + [TOKEN] * 2 + [LOGIT] * 2, dtype=np.int8)
    layer = np.r_[rng.integers(0, N_LAYERS, n_feat), [-1, -1], [N_LAYERS] * 2].astype(np.int16)
    pos = np.r_[rng.integers(8, 13, n_feat), [3, 11], [12, 12]].astype(np.int32)
    feature = np.r_[rng.integers(0, 6, n_feat), [5, 7], [9, 10]].astype(np.int32)
    activation = np.r_[rng.random(n_feat), [0, 0], [0.6, 0.3]].astype(np.float32)
    influence = np.r_[rng.random(n_feat), rng.random(2), [0.6, 0.3]].astype(np.float32)
    src = rng.integers(0, 14, 30).astype(np.int32)
    dst = rng.integers(n_feat, 16, 30).astype(np.int32)
    weight = rng.normal(size=30).astype(np.float32)
    return StepGraph("t", 1, 12, kind, layer, pos, feature, activation, influence, src, dst, weight)


def _active(graph: StepGraph, window: tuple[int, int]) -> dict[tuple[int, int], tuple[int, ...]]:
    """Graph features plus extra active features on every layer, as a recording would give."""
    active: dict[tuple[int, int], set[int]] = {}
    for i in np.flatnonzero(graph.kind == FEATURE):
        active.setdefault((int(graph.layer[i]), int(graph.feature[i])), set()).add(
            int(graph.pos[i])
        )
    for layer in range(N_LAYERS):
        for feature in range(100, 110):
            active[(layer, feature)] = {window[0] + feature % 3}
    return {k: tuple(sorted(v)) for k, v in sorted(active.items())}


def test_proposals_are_deterministic_and_ranked(subject):
    graph, window = _graph(), (9, 12)
    active = _active(graph, window)
    args = (graph, window, active, 4, "influence", "suppress", 2.0, "step")
    first, again = propose(*args), propose(*args)
    assert first == again and len(first) == 4
    assert [p.score for p in first] == sorted((p.score for p in first), reverse=True)
    for p in first:
        assert p.source == "graph" and p.value == 0.0 and p.start == window[0]
        assert all(window[0] <= q <= window[1] for q in p.positions)
        in_window = (graph.pos >= 9) & (graph.layer == p.layer) & (graph.feature == p.feature)
        assert set(graph.pos[in_window & (graph.kind == FEATURE)].tolist()) <= set(p.positions)
    by_layer = propose(graph, window, active, 4, "layer", "amplify", 3.0, "onward")
    assert [p.layer for p in by_layer] == sorted((p.layer for p in by_layer), reverse=True)
    assert all(
        p.value == 3.0 and p.target_positions(15) == (9, 10, 11, 12, 13, 14) for p in by_layer
    )
    a = random_control(first, active, step_rng(7, "t:1"))
    assert a == random_control(first, active, step_rng(7, "t:1"))
    draws = {tuple(random_control(first, active, step_rng(s, "t:1"))) for s in range(6)}
    assert len(draws) > 1


def test_step_scope_drops_candidates_that_cannot_change_the_step():
    graph, window = _graph(3), (9, 11)
    graph.feature[0], graph.layer[0], graph.pos[0] = 50, 2, 12  # only at the explained token
    step = propose(graph, window, {}, 50, "influence", "suppress", 2.0, "step")
    onward = propose(graph, window, {}, 50, "influence", "suppress", 2.0, "onward")
    assert (2, 50) not in {(p.layer, p.feature) for p in step}
    assert (2, 50) in {(p.layer, p.feature) for p in onward}
    assert all(p.positions and max(p.positions) <= 11 for p in step)
    assert len(onward) > len(step) > 0


def test_random_control_matches_layers_and_count():
    graph, window = _graph(1), (8, 12)
    active = _active(graph, window)
    proposals = propose(graph, window, active, 5, "influence", "amplify", 2.0, "step")
    controls = random_control(proposals, active, step_rng(0, "t:1"))
    assert len(controls) == len(proposals)
    assert [c.layer for c in controls] == [p.layer for p in proposals]
    proposed = {(p.layer, p.feature) for p in proposals}
    assert len({(c.layer, c.feature) for c in controls}) == len(controls)
    for c, p in zip(controls, proposals, strict=True):
        assert (c.layer, c.feature) not in proposed and (c.layer, c.feature) in active
        assert (c.action, c.value, c.scope, c.source) == (p.action, p.value, p.scope, "random")
        assert c.positions == active[(c.layer, c.feature)]


def test_margin_matched_control_draws_at_the_pool_layers_and_positions():
    def cand(layer: int, feature: int, positions: tuple[int, ...]) -> Proposal:
        return Proposal(layer, feature, "suppress", 0.0, "step", 9, positions, 0.5, "graph")

    pool = [cand(0, 1, (9,)), cand(1, 2, (10, 11)), cand(1, 3, (12,)), cand(2, 4, (9,))]
    proposals = [pool[0], pool[1], pool[3]]
    active = {
        (0, 1): (9,),
        (0, 50): (9, 10),
        (0, 51): (10,),
        (0, 52): (9,),
        (1, 2): (10, 11),
        (1, 3): (12,),
        (1, 60): (11,),
        (1, 61): (9,),
        (1, 62): (12,),
        (1, 63): (10, 12),
        (2, 4): (9,),
        (2, 70): (12,),  # layer 2: no unproposed feature active at 9
    }
    eligible = {0: {(0, 50), (0, 52)}, 1: {(1, 60), (1, 63)}, 2: {(1, 62), (1, 63), (1, 3)}}
    drop_of = {key: float(key[1] % 7) for key in active}
    measured: list[list[Proposal]] = []

    def drops(ps: list[Proposal]) -> list[float]:
        measured.append(ps)
        return [drop_of[(p.layer, p.feature)] for p in ps]

    for seed in range(8):
        measured.clear()
        got = margin_matched_control(pool, proposals, active, 2, step_rng(seed, "t:1"), drops)
        [drawn] = measured  # every draw measured in one call, in pool order
        assert [d.layer for d in drawn] == [0, 1, 1]  # pool[3]'s layer had no eligible feature
        keys = [(d.layer, d.feature) for d in drawn]
        assert len(set(keys)) == 3 and not set(keys) & {(0, 1), (1, 2), (2, 4)}
        assert all(key in eligible[i] for i, key in enumerate(keys))
        for d in drawn:
            assert d.positions == active[(d.layer, d.feature)] and d.source == "margin_matched"
            assert (d.action, d.value, d.scope, d.start) == ("suppress", 0.0, "step", 9)
        best = sorted(keys, key=lambda k: (-drop_of[k], k))[:2]
        assert [(g.layer, g.feature) for g in got] == best
        assert [g.score for g in got] == [drop_of[k] for k in best]
    again = margin_matched_control(pool, proposals, active, 2, step_rng(3, "t:1"), drops)
    assert again == margin_matched_control(pool, proposals, active, 2, step_rng(3, "t:1"), drops)


def _by_hand(model, eos: int, ids: list[int], position: int, token: int, end: int) -> list[int]:
    """The trace up to `position`, `token`, then argmax decoding without a cache to `end`."""
    out = [*ids[: position + 1], token]
    with torch.no_grad():
        while len(out) < end:
            nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_second_choice_replaces_the_least_confident_token_then_decodes_greedily(subject):
    from crv.graphs.attribute import next_token_probs, step_positions

    adapter, tokenizer, _ = subject
    prompts = [PROMPT, "Q: Evaluate (2+3)*4\n"]  # different lengths: the batch is padded
    todo, expected = [], []
    for res in generate_greedy(adapter.model, tokenizer, prompts, 30):
        row = _row(res.prompt_ids, res.completion_ids, res.completion)
        ids, offset = row["input_ids"], len(res.prompt_ids)
        span = StepSpan(offset + 4, offset + 12)
        [position] = step_positions(
            [{"last_token": span.last_token}],
            offset + 3,
            "least_confident",
            next_token_probs(adapter.model, ids),
        )
        assert offset + 3 <= position < span.last_token
        with torch.no_grad():
            logits = adapter.model(input_ids=torch.tensor([ids[: position + 1]])).logits[0, -1]
        first, second = torch.topk(logits, 2).indices.tolist()
        assert first == ids[position + 1]  # greedy trace: the trace took the first choice
        assert second_choice_token(adapter.model, ids, position) == second
        n_new = 20
        end = span.first_token + n_new
        by_hand = _by_hand(adapter.model, tokenizer.eos_token_id, ids, position, second, end)
        start = min(span.first_token, position + 1)
        todo.append(SecondChoice(row, 0, span, position, n_new))
        text = tokenizer.decode(by_hand[start:], skip_special_tokens=True)
        expected.append((text, ids[position + 1], second, position))
    todo.append(SecondChoice(row, 0, span, len(ids) - 1, 5))  # no token after the position

    for batch_size in (64, 1):
        *outs, none = regenerate_second_choices(adapter, tokenizer, todo, batch_size)
        assert none is None
        for out, (text, original, second, position) in zip(outs, expected, strict=True):
            assert out.condition == "second_choice" and out.proposal is None and out.changed
            assert out.regenerated == text
            assert out.replacement == {
                "position": position + 1,
                "original": tokenizer.decode([original]),
                "replacement": tokenizer.decode([second]),
            }


def test_margin_ranking_measures_each_intervention(subject):
    adapter, tokenizer, tset = subject
    ids = tokenizer(PROMPT + "Step 1: 5+9=14, so 7*(14+7)\n")["input_ids"]
    position, window = 20, (12, 20)
    active = active_features(adapter, tset, ids, window)
    proposals = [
        Proposal(*key, "suppress", 0.0, "step", window[0], where, 0.0, "graph")
        for key, where in list(active.items())[:6]
    ]
    drops = margin_drops(adapter, tset, ids, position, proposals)
    # by hand: the top-two margin at `position` with and without the first edit
    x = torch.tensor([ids[: position + 1]])
    with torch.no_grad(), splice(adapter, tset, add_error=True):
        clean = adapter.model(input_ids=x).logits[0, -1]
    with (
        torch.no_grad(),
        splice(
            adapter,
            tset,
            add_error=True,
            interventions=[to_intervention(proposals[0], position + 1)],
        ),
    ):
        edited = adapter.model(input_ids=x).logits[0, -1]
    a, b = torch.topk(clean, 2).indices
    assert drops[0] == pytest.approx(
        float((clean[a] - clean[b]) - (edited[a] - edited[b])), abs=1e-5
    )
    assert any(abs(d) > 1e-6 for d in drops)
    # a named pair (a contrastive graph's wrong and correct token) is measured instead
    c, d = 5, 9
    paired = margin_drops(adapter, tset, ids, position, proposals, pair=(c, d))
    assert paired[0] == pytest.approx(
        float((clean[c] - clean[d]) - (edited[c] - edited[d])), abs=1e-5
    )

    # propose() keeps the candidates with the largest measured drops, best first
    graph = _graph(4)
    graph_window = (9, 12)
    fake = {key: float(key[0] * 10 + key[1]) for key in _active(graph, graph_window)}
    ranked = propose(
        graph,
        graph_window,
        _active(graph, graph_window),
        3,
        "margin",
        "suppress",
        2.0,
        "step",
        candidate_pool=50,
        margin_drops=lambda ps: [fake[(p.layer, p.feature)] for p in ps],
    )
    in_window = np.flatnonzero((graph.kind == FEATURE) & (graph.pos >= 9))
    keys = {(int(graph.layer[i]), int(graph.feature[i])) for i in in_window}
    assert [p.score for p in ranked] == sorted((fake[k] for k in keys), reverse=True)[:3]
    with pytest.raises(ValueError, match="margin_drops"):
        propose(graph, graph_window, {}, 3, "margin", "suppress", 2.0, "onward")


def test_verifier_ranking_and_drop_nodes():
    graph, window = _graph(2), (8, 12)

    # a stand-in verifier that finds layer-2 feature nodes suspicious
    def score(g: StepGraph) -> float:
        return float(np.sum((g.kind == FEATURE) & (g.layer == 2))) / 10

    ranked = rank_candidates(graph, window[0], "verifier", "suppress", score, candidate_pool=50)
    top_layers = [key[0] for key, s in ranked if s > 0]
    assert top_layers and set(top_layers) == {2}
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    amplified = rank_candidates(graph, window[0], "verifier", "amplify", score, candidate_pool=50)
    assert amplified[-1][1] < 0 and amplified[-1][0][0] == 2
    drop = np.zeros(graph.n_nodes, dtype=bool)
    drop[[0, 3]] = True
    smaller = drop_nodes(graph, drop)
    assert smaller.n_nodes == graph.n_nodes - 2
    kept_edges = ~np.isin(graph.src, [0, 3]) & ~np.isin(graph.dst, [0, 3])
    assert smaller.n_edges == int(kept_edges.sum())
    np.testing.assert_array_equal(smaller.weight, graph.weight[kept_edges])
    with pytest.raises(ValueError, match="score_graph"):
        rank_candidates(graph, window[0], "verifier")


def test_wilson_and_bootstrap_intervals():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 0) is None
    a, b = np.array([1, 1, 0, 1] * 10), np.array([0, 1, 0, 0] * 10)
    ci = paired_bootstrap_diff(a, b, 500, seed=0)
    assert ci == paired_bootstrap_diff(a, b, 500, seed=0)
    assert ci[0] <= 0.5 <= ci[1] and ci[0] > 0


def _outcome(
    proposal: Proposal | None,
    step_ok: bool,
    final_ok: bool,
    changed: bool = True,
    condition: str | None = None,
    text: str = "x",
) -> Outcome:
    source = condition or (proposal.source if proposal else "none")
    return Outcome(source, 0, proposal, text, changed, text, step_ok, None, final_ok)


P = Proposal(2, 5, "suppress", 0.0, "step", 9, (9, 10), 0.4, "graph")
R = Proposal(2, 101, "suppress", 0.0, "step", 9, (10,), 0.0, "random")
M = Proposal(1, 7, "suppress", 0.0, "step", 9, (9,), 0.3, "margin_matched")


def _attempt(
    i: int,
    incorrect: bool,
    fixes: list[bool],
    random_fix: list[bool],
    matched_fix: list[bool],
    second_fix: list[bool],
    consistent: bool = True,
    rule: str = "",
    texts: tuple[str, str] = ("orig", "x"),
    sampled: bool = True,
) -> StepAttempt:
    """A hand-made attempt: which of each condition's regenerations fix the step."""
    return StepAttempt(
        f"t{i}:1",
        f"t{i}",
        1,
        "arithmetic",
        incorrect,
        0.9,
        texts[0],
        False,
        StepSpan(10, 14),
        [P] * len(fixes),
        [R] * len(random_fix),
        _outcome(None, False, False, changed=not consistent),
        graph=[_outcome(P, ok, ok, text=texts[1]) for ok in fixes],
        random=[_outcome(R, ok, False) for ok in random_fix],
        margin_matched=[_outcome(M, ok, ok) for ok in matched_fix],
        second_choice=[_outcome(None, ok, ok, condition="second_choice") for ok in second_fix],
        planted_rule=rule,
        sampled=sampled,
        graph_kind="contrastive" if rule else "step",
    )


def test_summarize_rates_and_markdown():
    T, F = True, False
    attempts = [
        _attempt(0, T, [F, T], [F], [F, F], [T]),
        _attempt(1, T, [T, F], [T], [T, F], [F]),
        _attempt(2, T, [F, F], [F], [F, F], [T], consistent=False),
        _attempt(3, T, [F, F], [F], [F, T], [T]),
        _attempt(4, F, [F], [T], [F], [T]),
        _attempt(5, F, [T], [T], [T], []),
    ]
    out = summarize(attempts, n_flagged=9, n_false_alarms=3, n_examples=2, n_bootstrap=200, seed=0)
    assert (
        out["n_flagged"] == 9 and out["n_attempted"] == 4 and out["n_false_alarms_attempted"] == 2
    )
    assert out["fixed_step_rate"] == 0.5 and out["first_fixed_step_rate"] == 0.25
    assert out["random_fixed_step_rate"] == 0.25 and out["fixed_minus_random"] == 0.25
    assert out["fixed_answer_rate"] == 0.5 and out["broken_correct_rate"] == 0.5
    assert out["consistency_rate"] == pytest.approx(5 / 6, abs=1e-4)
    assert out["changed_step_rate"] == 1.0 and out["random_changed_step_rate"] == 1.0
    for key in ("fixed_step_rate", "consistency_rate", "fixed_minus_random", "broken_correct_rate"):
        low, high = out[f"{key}_ci"]
        assert low <= out[key] <= high
    assert out["planted"] is None

    # each control: its own rates, and proposals minus control paired over the same steps
    controls = out["controls"]
    assert set(controls) == {"random", "margin_matched", "second_choice"}
    expected = {  # fixed (best), first fixed, final answer, broke, diff, first_diff, broke_diff
        "random": (0.25, 0.25, 0.0, 0.0, 0.25, 0.0, 0.5),
        "margin_matched": (0.5, 0.25, 0.5, 0.5, 0.0, 0.0, 0.0),
        "second_choice": (0.75, 0.75, 0.75, 0.0, -0.25, -0.5, 0.5),
    }
    keys = ("fixed_step_rate", "first_fixed_step_rate", "fixed_answer_rate", "broke_rate")
    for name, values in expected.items():
        c = controls[name]
        assert tuple(c[k] for k in (*keys, "diff", "first_diff", "broke_diff")) == values
        for k in ("diff", "first_diff", "broke_diff"):
            assert c[f"{k}_ci"][0] <= c[k] <= c[f"{k}_ci"][1]
    second_fixed = np.array([1, 0, 1, 1], dtype=bool)
    assert controls["second_choice"]["diff_ci"] == paired_bootstrap_diff(
        np.array([1, 1, 0, 0], dtype=bool), second_fixed, 200, 0
    )
    assert controls["random"]["diff_ci"] == out["fixed_minus_random_ci"]

    assert [ex["step_id"] for ex in out["examples"]] == ["t0:1", "t1:1"]
    ex = out["examples"][0]
    assert ex["fixed_step"] and "L2/F5" in ex["intervention"] and ex["planted_rule"] == ""
    assert ex["controls"]["margin_matched"]["intervention"].startswith("suppress L1/F7")
    md = interventions_markdown(out)
    assert "0.500 [" in md and "t0:1" in md and "suppress L2/F5" in md
    assert "| all (4 / 2) | margin-matched random features | 0.500 [" in md
    assert "| all (4 / 2) | second-choice token (no transcoders) | 0.750 [" in md
    assert "-0.500 [" in md and "planted" not in md


def test_planted_rule_steps_are_compared_on_their_own():
    T, F = True, False
    planted = ("7*8=57", "7*8=56")
    attempts = [
        _attempt(0, T, [F, T], [F], [F, F], [F], rule="seven_times", texts=planted),
        _attempt(1, T, [F, F], [F], [T, F], [T], rule="seven_times"),
        _attempt(2, T, [T, F], [F], [F, F], [F], rule="not_or"),
        _attempt(3, T, [F, F], [T], [F, F], [T]),
        _attempt(4, T, [T, T], [T], [T, T], [T]),
        _attempt(5, F, [F], [F], [T], [T], rule="seven_times"),
    ]
    out = summarize(attempts, n_flagged=5, n_false_alarms=1, n_examples=2, n_bootstrap=100, seed=0)
    assert out["fixed_step_rate"] == 0.6 and out["n_attempted"] == 5
    p = out["planted"]
    assert p["n_attempted"] == 3 and p["n_false_alarms_attempted"] == 1
    assert p["fixed_step_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert p["broken_correct_rate"] == 1.0
    c = p["controls"]
    assert c["random"]["fixed_step_rate"] == 0.0 and c["random"]["broke_rate"] == 1.0
    assert c["margin_matched"]["fixed_step_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert c["second_choice"]["diff"] == pytest.approx(1 / 3, abs=1e-4)
    assert c["second_choice"]["broke_diff"] == 1.0
    assert set(p["rules"]) == {"seven_times", "not_or"}
    seven = p["rules"]["seven_times"]
    assert (seven["n_attempted"], seven["n_false_alarms_attempted"]) == (2, 1)
    assert seven["fixed_step_rate"] == 0.5 and seven["controls"]["second_choice"]["diff"] == 0.0
    assert p["rules"]["not_or"]["fixed_step_rate"] == 1.0
    [example] = seven["examples"]
    assert (example["original_step"], example["regenerated_step"]) == planted
    assert example["fixed_step"] and example["step_id"] == "t0:1"
    # the worked examples give planted steps at least half the places (fixed ones first)
    assert [ex["step_id"] for ex in out["examples"]] == ["t0:1", "t4:1"]
    md = interventions_markdown(out)
    assert "| planted rules (3 / 1) | proposals | 0.667 [" in md
    assert "| rule `seven_times` (2 / 1) | second-choice token" in md
    assert "planted rule `seven_times`" in md and "`7*8=56`" in md


def test_planted_steps_outside_the_sample_count_only_among_planted_steps():
    from crv.interventions.stage import attempt_from_dict

    T, F = True, False
    flagged = [
        _attempt(0, T, [T], [F], [F], [F], rule="not_or"),
        _attempt(1, T, [F], [F], [F], [T]),
    ]
    extra = [
        _attempt(2, T, [F], [F], [F], [T], rule="not_or", sampled=False),
        _attempt(3, T, [F], [F], [T], [T], rule="not_or", sampled=False),
    ]
    out = summarize(flagged + extra, 2, 0, n_examples=2, n_bootstrap=100, seed=0)
    alone = summarize(flagged, 2, 0, n_examples=2, n_bootstrap=100, seed=0)
    for key in ("n_attempted", "fixed_step_rate", "controls"):
        assert out[key] == alone[key]
    p = out["planted"]
    assert p["n_attempted"] == 3 and p["n_outside_sample"] == 2
    assert p["graph_kinds"] == {"contrastive": 3}
    assert p["fixed_step_rate"] == pytest.approx(1 / 3, abs=1e-4)
    second = p["rules"]["not_or"]["controls"]["second_choice"]
    assert second["diff"] == pytest.approx(1 / 3 - 2 / 3, abs=1e-4)
    assert second["diff_ci"] == paired_bootstrap_diff(
        np.array([1, 0, 0], bool), np.array([0, 1, 1], bool), 100, 0
    )
    back = attempt_from_dict(extra[0].to_dict())
    assert not back.sampled and back.graph_kind == "contrastive"


def test_config_defaults():
    cfg = InterventionsConfig()
    assert cfg.max_steps >= 50  # the issue asks for >= 50 attempted steps on the default run
    assert cfg.rank_by == "margin"
    with pytest.raises(ValueError, match="rank_by"):
        InterventionsConfig(rank_by="gradient")
    with pytest.raises(ValueError, match="scope"):
        InterventionsConfig(scope="everywhere")


def _trace_row(tokenizer, problem: Problem, prompt_ids, completion_ids, split: str) -> dict:
    from crv.tasks.label import label_steps
    from crv.tokens import last_token_index, token_char_ends

    completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
    row = _row(prompt_ids, completion_ids, completion) | {
        "id": problem.id,
        "problem": problem.expression,
        "gold": problem.gold,
        "split": split,
    }
    steps, final, final_correct = label_steps(row, completion)
    ends = token_char_ends(tokenizer, completion_ids, completion)
    for s in steps:
        s["last_token"] = last_token_index(ends, s["end_char"], len(prompt_ids))
    return row | {
        "prompt": problem.prompt,
        "steps": steps,
        "final_answer": final,
        "final_correct": final_correct,
    }


def _fake_graph(adapter, tset, row: dict, step: dict, seed: int) -> StepGraph:
    """A small graph over features really active in the step (influence made up)."""
    span = StepSpan(step["last_token"] - 3, step["last_token"])  # stand-in first token
    active = active_features(adapter, tset, row["input_ids"], span.window(step["last_token"]))
    keys = list(active)[:: max(1, len(active) // 8)][:8]
    rng = np.random.default_rng(seed)
    n = len(keys)
    kind = np.array([FEATURE] * n + [TOKEN, LOGIT], dtype=np.int8)
    layer = np.array([k[0] for k in keys] + [-1, N_LAYERS], dtype=np.int16)
    pos = np.array([active[k][0] for k in keys] + [step["last_token"]] * 2, dtype=np.int32)
    feature = np.array([k[1] for k in keys] + [5, 6], dtype=np.int32)
    activation = np.r_[rng.random(n), [0.0, 0.9]].astype(np.float32)
    influence = np.r_[rng.random(n), [0.1, 0.9]].astype(np.float32)
    src = np.r_[np.arange(n), [n]].astype(np.int32)
    dst = np.full(n + 1, n + 1, dtype=np.int32)
    weight = rng.normal(size=n + 1).astype(np.float32)
    return StepGraph(
        row["id"],
        step["index"],
        step["last_token"],
        kind,
        layer,
        pos,
        feature,
        activation,
        influence,
        src,
        dst,
        weight,
        {"n_active_features": 40.0},
    )


def test_run_stage_end_to_end(subject, tmp_path):
    import logging

    from datasets import Dataset

    from crv.features.compute import feature_names
    from crv.features.config import FeaturesConfig
    from crv.features.table import TABLE_FILE, feature_table
    from crv.graphs.store import save_step_graphs, trace_file
    from crv.interventions.stage import RESULTS_FILE, attempt_from_dict, graph_scorer, run_stage
    from crv.io import atomic_write_json, read_json
    from crv.pipeline import MANIFEST, MissingArtifactError, StageContext
    from crv.traces.steps import step_key_table
    from crv.transcoders.io import save_transcoder_set
    from crv.verifier.classifier import XGBVerifier
    from crv.verifier.config import VerifierConfig

    adapter, tokenizer, tset = subject
    dirs = {
        name: tmp_path / name
        for name in ("subject", "traces", "transcoders", "graphs", "features", "verifier", "out")
    }
    adapter.model.save_pretrained(dirs["subject"])
    tokenizer.save_pretrained(dirs["subject"])
    save_transcoder_set(tset, dirs["transcoders"])

    problems = [
        Problem(f"arithmetic-n3-{i:06d}", "arithmetic", 3, e, g)
        for i, (e, g) in enumerate([("7*((5+9)+7)", "147"), ("(2+3)*(4+1)", "25")])
    ]
    generated = generate_greedy(adapter.model, tokenizer, [p.prompt for p in problems], 30)
    rows = [
        _trace_row(
            tokenizer, problems[0], generated[0].prompt_ids, generated[0].completion_ids, "test"
        )
    ]
    solution_ids = tokenizer(problems[1].solution(), add_special_tokens=False)["input_ids"]
    rows.append(_trace_row(tokenizer, problems[1], generated[1].prompt_ids, solution_ids, "test"))
    assert rows[0]["steps"][0]["label"] is False and rows[1]["steps"][0]["label"] is True
    Dataset.from_list(rows).save_to_disk(str(dirs["traces"] / "dataset"))

    graphs = {
        r["id"]: [_fake_graph(adapter, tset, r, s, i) for i, s in enumerate(r["steps"])]
        for r in rows
    }
    for trace_id, trace_graphs in graphs.items():
        save_step_graphs(trace_file(dirs["graphs"], trace_id), trace_id, trace_graphs)

    from datasets import load_from_disk

    names = feature_names(N_LAYERS)
    table = feature_table(
        [g for gs in graphs.values() for g in gs],
        step_key_table(load_from_disk(str(dirs["traces"] / "dataset"))),
        N_LAYERS,
        FeaturesConfig(),
        0,
    )
    dirs["features"].mkdir()
    table.to_parquet(dirs["features"] / TABLE_FILE, index=False)
    with pytest.raises(MissingArtifactError, match="features is not a complete artifact"):
        graph_scorer(dirs["features"], {}, N_LAYERS, 0)  # never a silent default config
    atomic_write_json(dirs["features"] / MANIFEST, {"config": asdict(FeaturesConfig())})

    rng = np.random.default_rng(0)
    verifier = XGBVerifier(VerifierConfig(n_estimators=5), names, 0)
    x = rng.normal(size=(40, len(names)))
    verifier.fit(x, np.arange(40) % 2, np.arange(40))
    verifier.threshold = 0.0  # flag every step
    verifier.save(dirs["verifier"] / "tasks" / "arithmetic")

    cfg = InterventionsConfig(
        n_proposals=2,
        max_steps=5,
        max_correct_steps=1,
        extra_new_tokens=4,
        rank_by="verifier",
        n_bootstrap=100,
    )
    ctx = StageContext(
        "interventions",
        cfg,
        {k: v for k, v in dirs.items() if k != "out"},
        dirs["out"],
        tmp_path / "scratch",
        0,
        "cpu",
        logging.getLogger("test"),
    )
    dirs["out"].mkdir()
    result = run_stage(ctx)
    n_wrong = int((table["label"] == 1).sum())
    assert result["n_flagged"] == n_wrong and result["n_attempted"] == n_wrong
    assert result["n_false_alarms"] == int((table["label"] == 0).sum())
    assert result["n_false_alarms_attempted"] == 1
    assert result["consistency_rate_ci"] is not None
    saved = read_json(dirs["out"] / RESULTS_FILE)
    assert len(saved["attempts"]) == n_wrong + 1
    wrong = next(a for a in saved["attempts"] if a["incorrect"] and a["trace_id"] == rows[0]["id"])
    assert wrong["consistent"]  # the model's own trace comes back without intervention
    conditions = [o["condition"] for o in wrong["outcomes"]]
    assert conditions[0] == "none"
    assert [conditions.count(c) for c in ("graph", "random", "margin_matched")] == [2, 2, 2]
    assert conditions.count("second_choice") == 1 and wrong["planted_rule"] == ""
    matched = [o["proposal"] for o in wrong["outcomes"] if o["condition"] == "margin_matched"]
    assert matched[0]["score"] >= matched[1]["score"]  # ranked by measured margin drop
    false_alarm = next(a for a in saved["attempts"] if not a["incorrect"])
    assert [o["condition"] for o in false_alarm["outcomes"]] == [
        "none",
        "graph",
        "random",
        "margin_matched",
        "second_choice",
    ]
    for name in ("random", "margin_matched", "second_choice"):
        block = result["controls"][name]
        assert {"fixed_step_rate", "broke_rate", "diff", "diff_ci"} <= set(block)
        assert block["diff_ci"] is not None
    assert result["examples"] and "## " not in interventions_markdown(result)

    # each step's attempt is a scratch file that reads back as the same attempt; a rerun
    # keeps the finished ones and recomputes the missing one identically
    assert result["n_resumed_steps"] == 0
    for d in saved["attempts"]:
        assert json.loads(json.dumps(attempt_from_dict(d).to_dict())) == d  # tuples: lists
    attempt_files = sorted((tmp_path / "scratch" / "attempts").iterdir())
    assert len(attempt_files) == len(saved["attempts"])
    attempt_files[0].unlink()
    again = run_stage(replace(ctx, out=tmp_path / "again"))
    assert again["n_resumed_steps"] == len(attempt_files) - 1
    assert read_json(tmp_path / "again" / RESULTS_FILE) == saved

    # graph=contrastive: the incorrect step's contrastive graph proposes, its (wrong,
    # correct) pair is the margin, the second choice replaces the token after its position;
    # planted_steps=all adds nothing here (no planted rule); a step without one keeps its graph
    from crv.graphs.store import CONTRAST_DIR

    wrong_row = rows[0]
    contrast = _fake_graph(adapter, tset, wrong_row, wrong_row["steps"][0], 7)
    p = contrast.position - 1
    contrast.position = p
    contrast.pos[contrast.kind == LOGIT] = p
    wrong_id, right_id = int(wrong_row["input_ids"][p + 1]), int(wrong_row["input_ids"][p])
    contrast.scores = {"contrast_token": float(wrong_id), "contrast_baseline": float(right_id)}
    for r in rows:
        found = [contrast] if r is wrong_row else []
        save_step_graphs(trace_file(dirs["graphs"], r["id"], CONTRAST_DIR), r["id"], found)
    ccfg = replace(cfg, graph="contrastive", planted_steps="all", rank_by="margin")
    cctx = replace(ctx, cfg=ccfg, out=tmp_path / "contrastive", scratch=tmp_path / "cscratch")
    cctx.out.mkdir()
    cresult = run_stage(cctx)
    assert cresult["graph"] == "contrastive" and cresult["n_attempted"] == n_wrong
    csaved = read_json(cctx.out / RESULTS_FILE)["attempts"]
    kinds = {(a["trace_id"], a["step"]): a["graph_kind"] for a in csaved}
    assert kinds.pop((wrong_row["id"], 0)) == "contrastive"
    assert set(kinds.values()) == {"step"}
    cwrong = next(a for a in csaved if a["graph_kind"] == "contrastive")
    [second] = [o for o in cwrong["outcomes"] if o["condition"] == "second_choice"]
    assert second["replacement"]["position"] == p + 1
    proposed = [o["proposal"] for o in cwrong["outcomes"] if o["condition"] == "graph"]
    keys = {(int(contrast.layer[i]), int(contrast.feature[i])) for i in range(contrast.n_nodes)}
    assert proposed and all((q["layer"], q["feature"]) in keys for q in proposed)
    # the scores are the measured drops of logit(wrong) - logit(correct) at p
    drops = margin_drops(
        adapter, tset, wrong_row["input_ids"], p, [Proposal.from_dict(proposed[0])],
        (wrong_id, right_id),
    )  # fmt: skip
    assert proposed[0]["score"] == pytest.approx(drops[0], abs=1e-5)
