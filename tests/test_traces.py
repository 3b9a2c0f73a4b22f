"""The traces stage's prompts and file traces: chat-template prompts, calculation labels of
free text, and a file record's own steps teacher-forced with their own labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import load_from_disk
from factories import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from crv.pipeline import StageContext
from crv.subject.sources import shipped_tiny_dir, trained_with_planted_rules
from crv.tasks.gsm8k import calculations, label_free_text, step_label
from crv.traces.config import TracesConfig
from crv.traces.prompts import SYSTEM, build_prompt, resolve_style
from crv.traces.stage import run_stage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k_sample.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SOLUTION = "Step 1: 2+3=5, so 5*4\nStep 2: 5*4=20, so 20\nAnswer: 20\n"


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, exact round trip), with a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_prompt_states_the_format_and_gives_examples_as_turns() -> None:
    tokenizer = byte_tokenizer()
    prompt = build_prompt(tokenizer, "chat", "arithmetic", "7+(9-1)", [("(2+3)*4", SOLUTION)])
    assert prompt == (
        f"<|system|>{SYSTEM['synthetic']}<|end|>\n"
        "<|user|>Evaluate (2+3)*4<|end|>\n"
        f"<|assistant|>{SOLUTION.rstrip()}<|end|>\n"
        "<|user|>Evaluate 7+(9-1)<|end|>\n"
        "<|assistant|>"
    )
    assert "Step k: <operation>=<value>, so " in SYSTEM["synthetic"]
    plain = build_prompt(tokenizer, "plain", "arithmetic", "7+(9-1)", [("(2+3)*4", SOLUTION)])
    assert plain == f"Q: Evaluate (2+3)*4\n{SOLUTION}Q: Evaluate 7+(9-1)\n"


def test_prompt_style_auto_follows_the_tokenizer() -> None:
    assert resolve_style("auto", byte_tokenizer()) == "chat"
    assert resolve_style("auto", byte_tokenizer(chat=False)) == "plain"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_style("chat", byte_tokenizer(chat=False))
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        resolve_style("fancy", byte_tokenizer())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Half of 48 is 48/2=24.", [True]),
        ("Half of 48 is 48 / 2 = <<48/2=24>>24 cookies.", [True, True]),
        ("She makes 3 * 12 = 37 rolls.", [False]),
        ("Each costs $1,200 x 3 = $3,600 in all.", [True]),
        ("A third is 10 / 3 = 3.33 litres.", [True]),
        ("A third is 10 / 3 = 3 litres.", [False]),
        ("(24 - 4) / 2 = 10 and then 10 + 5 = 16.", [True, False]),
        ("Let x = 5 be the number of apples.", []),
        ("She has 5 apples.", []),
    ],
)
def test_calculations(text: str, expected: list[bool]) -> None:
    assert calculations(text) == expected


def test_free_text_labels() -> None:
    completion = "She bakes 3 * 12 = 36 rolls.\nShe smiles.\nIn all 12 + 36 = 48.\n#### 48\nQ: more"
    steps, final, correct = label_free_text(completion, "48")
    assert [(s["label"], s["reason"]) for s in steps] == [
        (True, "ok"),
        (None, "nothing_checkable"),
        (True, "ok"),
        (True, "right_answer"),
    ]
    assert final == "48" and correct
    wrong, final, correct = label_free_text("12 + 36 = 48.\n#### 48\n", "47")
    assert [s["label"] for s in wrong] == [True, False] and not correct
    cut, _, _ = label_free_text("3 * 12 = 35.\n35 + 1 = 36.\n#### 36\n", "36")
    assert [s["label"] for s in cut] == [False]  # steps after the first wrong one dropped
    assert step_label("nothing here") is None


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=2048)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = tmp_path_factory.mktemp("subject")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def traces_context(subject: Path, out: Path, scratch: Path, **cfg: object) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        name="traces",
        cfg=TracesConfig(**cfg),
        inputs={"subject": subject},
        out=out,
        scratch=scratch,
        seed=0,
        device="cpu",
        log=logging.getLogger("test"),
    )


def run_traces(subject: Path, out: Path, **cfg: object) -> list[dict]:
    run_stage(traces_context(subject, out, out.with_name(out.name + ".scratch"), **cfg))
    return list(load_from_disk(str(out / "dataset")))


def test_generation_resumes_from_the_finished_batches(subject_dir: Path, tmp_path: Path):
    """Each generation batch is a scratch file; a rerun decodes only the missing ones and
    writes the same dataset."""
    cfg = {"tasks": ["arithmetic"], "complexities": [3], "n_per_complexity": 6}
    cfg |= {"runtime_batch_size": 4, "max_new_tokens_factor": 0.3}
    scratch = tmp_path / "scratch"
    first = run_stage(traces_context(subject_dir, tmp_path / "a", scratch, **cfg))
    batches = sorted((scratch / "generations").iterdir())
    assert first["n_resumed_batches"] == 0 and len(batches) == 2
    batches[0].unlink()
    again = run_stage(traces_context(subject_dir, tmp_path / "b", scratch, **cfg))
    assert again["n_resumed_batches"] == 1
    rows = [list(load_from_disk(str(tmp_path / d / "dataset"))) for d in "ab"]
    assert rows[0] == rows[1] and len(rows[0]) == 6


def test_file_records_keep_their_labels_with_their_own_steps(
    subject_dir: Path, tmp_path: Path
) -> None:
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    extra = {
        "question": "How many rolls?",
        "answer": "#### 48",
        "steps": ["She makes 3 * 12 = 36 rolls.", "In all 12 + 36 = 49 rolls."],
    }
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*records, extra]) + "\n")
    rows = run_traces(
        subject_dir, tmp_path / "out", tasks=[], gsm8k_path=str(data), max_new_tokens_factor=0.2
    )
    tokenizer = byte_tokenizer()
    by_question = {r["problem"]: r for r in rows}
    given = [r for r in records if "labels" in r]
    assert len(given) == 2
    for record in [*given, extra]:
        row = by_question[record["question"]]
        assert row["teacher_forced"]
        own = record.get("steps") or [
            line for line in record["answer"].split("####")[0].splitlines() if line.strip()
        ]
        assert [s["text"] for s in row["steps"]] == own
        expected = record.get("labels") or [True, False]  # extra: its calculations checked
        assert [s["label"] for s in row["steps"]] == expected
        assert row["prompt"].startswith("<|system|>") and row["prompt"].endswith("<|assistant|>")
        ids = row["input_ids"]
        assert tokenizer.decode(ids[: row["prompt_len"]]) == row["prompt"]
        for step in row["steps"]:  # each step's last token is where its text ends
            upto = tokenizer.decode(ids[row["prompt_len"] : step["last_token"] + 1])
            assert upto.endswith(step["text"])
    for record in [r for r in records if "labels" not in r]:
        generated = by_question[record["question"]]
        assert not generated["teacher_forced"]  # only question and answer: generated afresh
        assert len(generated["input_ids"]) > generated["prompt_len"]


def test_reading_a_traces_artifact_never_writes_into_it(tmp_path: Path) -> None:
    """`filter` and `select` on loaded traces (graphs, benchmarks) leave the artifact's files
    as written: a datasets cache file inside it would fail the manifest check."""
    from datasets import Dataset

    from crv.traces.store import load_traces

    Dataset.from_dict({"id": list("abcdef"), "split": ["train", "test"] * 3}).save_to_disk(
        str(tmp_path / "dataset")
    )
    before = sorted(p.name for p in (tmp_path / "dataset").iterdir())
    traces = load_traces(tmp_path)
    assert traces.filter(lambda r: r["split"] == "test")["id"] == ["b", "d", "f"]
    assert traces.select([0, 3, 4])["id"] == ["a", "d", "e"]
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == before


@pytest.mark.parametrize("name", ["crv-tiny", "crv-tiny-bugs"])
def test_planted_rule_is_filled_only_for_a_subject_trained_with_the_rules(
    name: str, tmp_path: Path
) -> None:
    subject = shipped_tiny_dir(name)
    rows = run_traces(
        subject, tmp_path / "out", tasks=["arithmetic"], complexities=[3], n_per_complexity=12
    )
    rules = [s["planted_rule"] for r in rows for s in r["steps"]]
    assert trained_with_planted_rules(subject) == (name == "crv-tiny-bugs")
    assert any(rules) == (name == "crv-tiny-bugs")
    assert not trained_with_planted_rules(tmp_path / "out")  # not a crv-tiny model at all
