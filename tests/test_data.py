"""Demonstration files and their loading: JSONL errors with file:line, the shipped data
sets, response masks on real tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ivl_local.chat_template import render_messages
from ivl_local.errors import DataError
from ivl_local.train.data import IGNORE, read_jsonl, split_eval, tokenize_record, load_examples

DATA = Path(__file__).resolve().parents[1] / "data"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"text": "x"}), "expected a 'messages' list"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "message 0 must be"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (json.dumps({"prompt": "x", "response": 3}), "'prompt' and 'response' must both be strings"),
    (json.dumps({"prompt": "x", "response": ""}), "empty 'response'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "demo.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"demo.jsonl:4: {message}" in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no demonstrations"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="no such demonstration file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_split_is_seeded_and_disjoint():
    from ivl_local.train.data import Example

    examples = [Example((i,), (i,), i) for i in range(100)]
    train, evals = split_eval(examples, 0.1, seed=3)
    assert len(evals) == 10 and len(train) == 90
    assert {e.source_line for e in train}.isdisjoint({e.source_line for e in evals})
    assert split_eval(examples, 0.1, seed=3)[1] == evals


def test_shipped_datasets_are_well_formed():
    for name, minimum in [("arith_train.jsonl", 1000), ("arith_valid.jsonl", 300), ("arith_test.jsonl", 300),
                          ("chat_train.jsonl", 250), ("chat_test.jsonl", 20)]:
        rows = [r for _, r in read_jsonl(DATA / name)]
        assert len(rows) >= minimum, name
    arith_train = [r for _, r in read_jsonl(DATA / "arith_train.jsonl")]
    arith_test = [r for _, r in read_jsonl(DATA / "arith_test.jsonl")]
    arith_valid = [r for _, r in read_jsonl(DATA / "arith_valid.jsonl")]
    train_x, valid_x, test_x = ({r["metadata"]["expression"] for r in rows}
                                for rows in (arith_train, arith_valid, arith_test))
    assert train_x.isdisjoint(test_x) and valid_x.isdisjoint(train_x | test_x)
    chat_train = [r for _, r in read_jsonl(DATA / "chat_train.jsonl")]
    chat_test = [r for _, r in read_jsonl(DATA / "chat_test.jsonl")]
    assert {r["group"] for r in chat_train}.isdisjoint({r["group"] for r in chat_test})


@pytest.mark.parametrize("name", ["arith_valid.jsonl", "arith_test.jsonl"])
def test_arith_answers_score_with_reasoning_gym(name):
    reasoning_gym = pytest.importorskip("reasoning_gym")
    rows = [r for _, r in read_jsonl(DATA / name)][:50]
    dataset = reasoning_gym.create_dataset(rows[0]["task"], **rows[0]["task_config"])
    for row in rows:
        assert row["messages"][-1]["content"] == row["answer"]
        assert dataset.score_answer(row["answer"], row) == 1.0
        assert eval(row["metadata"]["expression"]) == int(row["answer"])  # noqa: S307 (digits and +/- only)


def test_chat_data_renders_in_the_fallback_format():
    row = [r for _, r in read_jsonl(DATA / "chat_train.jsonl")][0]
    text = render_messages(row["messages"], None, eos_token="<eos>", add_generation_prompt=False)
    assert text.startswith("User: ") and "\n\nAssistant: " in text and text.endswith("<eos>\n\n")


@pytest.mark.real
def test_response_mask_on_real_tokenizers(smollm2_path, gemma3_path, tmp_path):
    from ivl_local.train.basefile import BaseGGUF

    record = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                           {"role": "assistant", "content": "2 plus 3 is 5."}]}
    for path in (smollm2_path, gemma3_path):
        base = BaseGGUF.open(str(path))
        example = tokenize_record(record, base, max_len=512)
        response = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
        prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
        assert response and prompt
        assert [label for label in example.labels if label != IGNORE] == response
        assert base.eos_id in response                   # the assistant turn ends with EOS
        text = b"".join(base.tokens[t] for t in response).decode("utf-8", "replace")
        assert "5" in text and "What" not in text
        raw = tokenize_record({"prompt": "Q: hi\nA:", "response": " hello"}, base, max_len=512)
        assert raw.labels[-1] == base.eos_id and raw.labels[0] == IGNORE
    # every example of a file that cannot fit one response token -> DataError
    path = write_lines(tmp_path / "long.jsonl", [json.dumps({"prompt": "word " * 300, "response": "x"})])
    with pytest.raises(DataError, match="no example has a response token"):
        load_examples(path, base, max_len=16)
