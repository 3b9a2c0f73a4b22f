"""benchmarks/minimal_pairs.py: the pairs differ from the model's step as described, and the
script scores them with a bundle and prints the shares."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "minimal_pairs.py"


def solved_traces(n: int = 6):
    """Canonical solutions of 3-operator problems of both tasks as test traces."""
    from datasets import Dataset

    from crv.tasks import generate_problems

    rows = []
    for task in ("arithmetic", "boolean"):
        for i, p in enumerate(generate_problems(task, 3, n, seed=1, unique=True)):
            lines = [s for s in p.solution().splitlines() if s.startswith("Step")]
            steps = [{"index": j, "text": s, "label": True} for j, s in enumerate(lines)]
            rows.append(
                {
                    "id": f"{task}-{i}",
                    "task": task,
                    "split": "test",
                    "prompt": f"Q: Evaluate {p.expression}\n",
                    "steps": steps,
                }
            )
    return Dataset.from_list(rows)


@pytest.fixture(scope="module", name="minimal_pairs")
def minimal_pairs_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import minimal_pairs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return minimal_pairs


def test_pairs_change_one_thing(minimal_pairs) -> None:
    pairs = minimal_pairs.build_pairs(solved_traces(), 4, seed=0)
    cells = {(p.task, p.kind) for p in pairs}
    assert cells == {(t, k) for t in ("arithmetic", "boolean") for k in minimal_pairs.KINDS}
    assert len({(p.trace_id, p.kind) for p in pairs}) == len(pairs)  # one pair per trace
    for p in pairs:
        good = minimal_pairs.STEP.match(p.correct).groups()
        bad = minimal_pairs.STEP.match(p.corrupted).groups()
        assert good[:2] == bad[:2]  # same step number and computation
        if p.kind == "carried":
            assert good[2] != bad[2] and good[3].replace(good[2], bad[2]) == bad[3]
        else:
            assert good[2] == bad[2] and good[3] != bad[3]
            assert len(re.findall(r"[+*-]|and|or", good[3])) == len(
                re.findall(r"[+*-]|and|or", bad[3])
            )
    again = minimal_pairs.build_pairs(solved_traces(), 4, seed=0)
    assert [p.corrupted for p in again] == [p.corrupted for p in pairs]  # seeded


def test_script_scores_pairs_with_a_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    solved_traces().save_to_disk(str(tmp_path / "traces" / "dataset"))
    out = tmp_path / "pairs.json"
    cmd = [sys.executable, str(SCRIPT), str(tiny_bundle), str(tmp_path / "traces")]
    run = subprocess.run(
        [*cmd, "--n-per-cell", "2", "--json", str(out)], capture_output=True, text=True, check=True
    )
    assert "| all/all | 8 |" in run.stdout
    assert re.search(r"^bundle_higher: [01]\.\d{4}$", run.stdout, re.MULTILINE)
    result = json.loads(out.read_text())
    assert len(result["pairs"]) == 8
    perplexity = result["summary"]["all/all"]["perplexity"]
    higher = sum(p["corrupted"]["perplexity"] > p["correct"]["perplexity"] for p in result["pairs"])
    assert perplexity["higher"] == higher and perplexity["n"] == 8
    assert any(p["correct"]["bundle"] != p["corrupted"]["bundle"] for p in result["pairs"])
