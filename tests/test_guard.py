"""Verify while generating (`crv.check.guard`, `crv-verify generate=true`).

The bundle pairs the shipped crv-tiny (so that greedy decoding writes real step lines) with
random transcoders and a random verifier: scores mean nothing, so flags are forced with the
threshold (0: every step, above 1: none) or by a scorer that flags one chosen step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import random_transcoder_set
from fixtures_bundle import ATTRIBUTION, make_bundle, write_verifier

from crv.bundle import Bundle, load_bundle
from crv.check.config import VerifyConfig
from crv.check.guard import Guard, GuardedTrace
from crv.check.inputs import Prompt, parse_trace
from crv.check.scorer import StepVerifier
from crv.cli.verify import render_table, verify_command
from crv.generation import GreedyDecoder, generate_greedy
from crv.graphs.config import Position
from crv.graphs.graph import StepGraph
from crv.interventions.apply import StepSpan, regenerate_batch
from crv.subject.sources import shipped_tiny_dir
from crv.tasks import generate_problems
from crv.tasks.label import unlabelled_steps
from crv.tasks.segment import segment_steps
from crv.tokens import step_token_spans
from crv.transcoders.io import save_transcoder_set

PROMPTS = [p.prompt for p in generate_problems("arithmetic", 4, 2, seed=5)] + [
    generate_problems("boolean", 3, 1, seed=5)[0].prompt
]


def guard_parts(root: Path) -> dict[str, Path]:
    parts = {
        "subject_dir": shipped_tiny_dir("crv-tiny"),
        "transcoders_dir": root / "transcoders",
        "verifier_dir": write_verifier(root / "verifier", n_layers=4),
    }
    # decoder rows 20x longer than random ones: features, not errors, carry the graphs
    tset = random_transcoder_set(128, 256, 8, range(4), init=lambda tc, _: tc.W_dec.mul_(20.0))
    save_transcoder_set(tset, parts["transcoders_dir"])
    return parts


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    root = tmp_path_factory.mktemp("guard")
    return load_bundle(make_bundle(root, guard_parts(root), n_layers=4))


@pytest.fixture(scope="module")
def step_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The same bundle with whole-step graphs (`graphs.position=step`)."""
    root = tmp_path_factory.mktemp("guard-step")
    graphs = dataclasses.replace(ATTRIBUTION, position=Position.step)
    return load_bundle(make_bundle(root, guard_parts(root), n_layers=4, graphs=graphs))


def guard(bundle: Bundle, **options: Any) -> Guard:
    return Guard(StepVerifier(bundle, VerifyConfig(max_new_tokens=120, **options)))


def run(g: Guard, prompt: str) -> GuardedTrace:
    return g.generate(Prompt(1, "p", prompt))


def plain(bundle: Bundle, prompt: str) -> list[int]:
    """Plain greedy decoding, as the traces stage generates."""
    [result] = generate_greedy(
        bundle.model, bundle.tokenizer, [prompt], 120, stop_patterns=VerifyConfig().stop
    )
    return result.completion_ids


def first_tokens(bundle: Bundle, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
    """Index into the completion of each step's first token."""
    text = bundle.tokenizer.decode(completion_ids, skip_special_tokens=True)
    spans = segment_steps(text, bundle.step_pattern)
    first, _ = step_token_spans(bundle.tokenizer, completion_ids, text, spans, 0)
    return first


def test_decoder_cut_back_predicts_as_a_fresh_one(bundle: Bundle):
    ids = bundle.tokenizer(PROMPTS[0] + "Step 1: 2")["input_ids"]
    decoder = GreedyDecoder(bundle.model, ids)
    decoder.feed([5, 6, 7])
    decoder.truncate(len(ids) - 2, recompute_from=len(ids) - 4)
    fresh = GreedyDecoder(bundle.model, ids[:-2])
    assert decoder.ids == ids[:-2]
    torch.testing.assert_close(decoder.logits_V, fresh.logits_V, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{"correct": "none", "threshold": 0.0},
                                     {"correct": "second_choice", "threshold": 1.5},
                                     {"correct": "second_choice", "threshold": 0.0,
                                      "max_corrections": 0}])  # fmt: skip
def test_without_corrections_the_trace_is_plain_greedy_token_for_token(
    bundle: Bundle, options: dict[str, Any]
):
    g = guard(bundle, **options)
    for prompt in PROMPTS:
        result = run(g, prompt)
        expected = plain(bundle, prompt)
        assert result.completion_ids == expected
        assert result.corrections == []
        texts = [result.completion[s:e] for s, e in segment_steps(result.completion)]
        assert [s["text"] for s in result.steps] == texts and len(texts) >= 3
        assert all(s["flagged"] == (options["threshold"] == 0.0) for s in result.steps)
        assert result.ended == "stop"  # crv-tiny writes its Answer line


@pytest.mark.parametrize("whole_step", [False, True])
def test_steps_are_scored_as_crv_verify_scores_the_finished_trace(
    bundle: Bundle, step_bundle: Bundle, whole_step: bool
):
    """Step by step while decoding (probabilities from decoding, the attribution extended
    per step) gives crv-verify's scores and features of the finished completion; with
    whole-step graphs too (their graphs explain every position of a step)."""
    g = guard(step_bundle if whole_step else bundle, correct="none")
    for prompt in PROMPTS[:1] if whole_step else PROMPTS:
        result = run(g, prompt)
        raw = json.dumps({"prompt": prompt, "completion": result.completion}).encode()
        trace = parse_trace(raw, 1, bundle.step_pattern)
        assert g.verifier.encode(trace).input_ids == result.prompt_ids + result.completion_ids
        records = g.verifier.verify(trace)
        assert [s["text"] for s in result.steps] == [r["text"] for r in records]
        scores = [s["score"] for s in result.steps]
        np.testing.assert_allclose(scores, [r["score"] for r in records], rtol=1e-6)
        for step, record in zip(result.steps, records, strict=True):
            ours, theirs = step["top_features"], record["top_features"]
            assert [(f["layer"], f["feature"]) for f in ours] == [
                (f["layer"], f["feature"]) for f in theirs
            ]
            np.testing.assert_allclose(  # the graphs' influences, not only the verifier's view
                [f["influence"] for f in ours], [f["influence"] for f in theirs], rtol=1e-5
            )


def flag_only_step(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    """Score step `index` 1 and every other step 0 (the rewritten one too)."""

    def scores(self: StepVerifier, graphs: list[StepGraph], inputs: object) -> np.ndarray:
        return np.array([float(g.step == index) for g in graphs])

    monkeypatch.setattr(StepVerifier, "scores", scores)


def test_second_choice_changes_only_the_flagged_step_and_what_follows(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
):
    flag_only_step(monkeypatch, 1)
    g = guard(bundle, correct="second_choice", threshold=0.5)
    prompt = PROMPTS[0]
    expected = plain(bundle, prompt)
    result = run(g, prompt)
    [correction] = result.corrections
    n_prompt = len(result.prompt_ids)
    changed = correction["replacement"]["position"] - n_prompt
    step_start = first_tokens(bundle, result.prompt_ids, expected)[1]
    assert step_start <= changed  # inside step 1, never before it
    assert result.completion_ids[:changed] == expected[:changed]
    assert result.completion_ids[changed] != expected[changed]
    assert bundle.tokenizer.decode([expected[changed]]) == correction["replacement"]["original"]
    plain_text = bundle.tokenizer.decode(expected, skip_special_tokens=True)
    plain_steps = [plain_text[s:e] for s, e in segment_steps(plain_text)]
    assert result.steps[0]["text"] == plain_steps[0] and not result.steps[0]["corrected"]
    assert correction["before"]["text"] == plain_steps[1]
    assert correction["after"]["text"] == result.steps[1]["text"] != plain_steps[1]
    assert result.steps[1]["corrected"] and result.steps[1]["flagged"]  # scored, kept
    table = render_table([{"id": "p", "line": 1, **result.fields(), "error": None}], 0.5)
    assert "!!*" in table and "1 corrections (* rewritten)" in table


def test_intervention_rewrites_the_step_as_the_interventions_stage_regenerates_it(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
):
    flag_only_step(monkeypatch, 1)
    # amplified 10x, the random transcoders' top feature changes the step (suppressed, not)
    g = guard(bundle, correct="intervention", threshold=0.5, action="amplify", amplify_scale=10.0)
    prompt = PROMPTS[1]
    expected = plain(bundle, prompt)
    result = run(g, prompt)
    [correction] = result.corrections
    [feature] = correction["features"]
    assert feature["action"] == "amplify" and feature["scale"] == 10.0
    assert correction["after"]["text"] != correction["before"]["text"]
    n_prompt = len(result.prompt_ids)
    step_start = first_tokens(bundle, result.prompt_ids, expected)[1]
    assert result.completion_ids[:step_start] == expected[:step_start]

    # The same proposal, regenerated by crv.interventions.apply from the plain trace.
    text = bundle.tokenizer.decode(expected, skip_special_tokens=True)
    raw = json.dumps({"prompt": prompt, "completion": text}).encode()
    trace = parse_trace(raw, 1, bundle.step_pattern)
    enc = g.verifier.encode(trace)
    assert enc.input_ids == result.prompt_ids + expected
    span = StepSpan(enc.first_tokens[1], enc.last_tokens[1])
    graph = g.verifier.graphs(trace, enc)[1]
    proposal = g.verifier.propose(enc.input_ids, span, graph, None)[0]
    assert (proposal.layer, proposal.feature) == (feature["layer"], feature["feature"])
    [outcome] = regenerate_batch(
        bundle.adapter, bundle.transcoders, bundle.tokenizer,
        {"input_ids": enc.input_ids, "prompt_len": n_prompt}, 1, span, 60, [proposal], [0],
        label=lambda completion: unlabelled_steps(completion, bundle.step_pattern),
    )  # fmt: skip
    assert correction["after"]["text"] == outcome.step_text == result.steps[1]["text"]


@pytest.mark.parametrize("budget", [1, 2])
def test_the_correction_budget_holds(bundle: Bundle, budget: int):
    g = guard(bundle, correct="second_choice", threshold=0.0, max_corrections=budget)
    result = run(g, PROMPTS[0])
    assert len(result.corrections) == budget
    assert all(s["flagged"] for s in result.steps)  # every step flagged ...
    rewritten = [s for s in result.steps if s["corrected"]]
    untouched = [s for s in result.steps if not s["corrected"]]
    assert len(rewritten) <= budget and untouched  # ... yet only `budget` were rewritten
    assert [c["step"] for c in result.corrections] == sorted(
        {c["step"] for c in result.corrections}
    )


def test_bad_lines_get_clear_errors_and_good_ones_are_generated(bundle: Bundle, tmp_path: Path):
    lines = [
        json.dumps({"id": "good", "prompt": PROMPTS[2]}),
        '{"prompt": "Q: 1',
        json.dumps({"id": "traced", "prompt": PROMPTS[2], "steps": ["Step 1: x"]}),
        json.dumps({"id": "none"}),
        json.dumps({"id": "blank", "prompt": "  "}),
        json.dumps({"id": "long", "prompt": "Q: Evaluate " + "1+" * 600 + "1\n"}),
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = VerifyConfig(
        bundle=str(bundle.path), input=str(src), output=str(out), quiet=True, generate=True,
        correct="second_choice", max_new_tokens=120,
    )  # fmt: skip
    assert verify_command(cfg) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    good = records[0]
    assert good["error"] is None and good["id"] == "good"
    assert good["completion"].startswith("Step 1:") and len(good["steps"]) >= 2
    errors = [r["error"] for r in records[1:]]
    assert errors[0].startswith("line 2: not valid JSON")
    assert errors[1] == (
        "line 3: generate=true writes the steps itself: give only 'id' and 'prompt' "
        "(the line has 'steps')"
    )
    assert errors[2] == "line 4: missing 'prompt'"
    assert errors[3] == "line 5: the prompt is empty"
    assert "no room left in the model's context of 1024 tokens" in errors[4]
    assert [r["id"] for r in records] == ["good", None, "traced", "none", "blank", "long"]
    bad = dataclasses.replace(cfg, intervene=True)
    assert verify_command(bad) == 2
