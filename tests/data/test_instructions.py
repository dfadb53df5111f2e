import gzip
import json

import pytest

from moe_understudy.data import (
    Example,
    detect_format,
    load_hf_instructions,
    load_instructions,
    split_by_task,
    train_val_test,
)
from moe_understudy.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dolly_rows_use_the_template_with_context_and_category_as_task(tmp_path):
    rows = [
        {
            "instruction": "Summarise.",
            "context": "Cats sleep a lot.",
            "response": "Cats nap.",
            "category": "summarization",
        },
        {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"},
    ]
    examples = load_instructions(_jsonl(tmp_path / "dolly.jsonl", rows))
    assert examples[0] == Example(
        "Instruction: Summarise.\n\nInput: Cats sleep a lot.\n\nResponse:",
        "Cats nap.",
        "summarization",
        ("Cats nap.",),
    )
    assert examples[1].prompt == "Instruction: Name a colour.\n\nResponse:"  # no Input block when empty
    assert examples[1].task == "open_qa"


def test_alpaca_json_list(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hi"},
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    examples = load_instructions(tmp_path / "alpaca.json")
    assert [e.prompt for e in examples] == [
        "Instruction: Add.\n\nInput: 2 + 2\n\nResponse:",
        "Instruction: Greet.\n\nResponse:",
    ]
    assert [e.response for e in examples] == ["4", "Hi"]


def test_prompt_response_gzip_keeps_prompt_and_task_and_appends_the_cue_once(tmp_path):
    rows = [
        {"task": "sentiment", "prompt": "Review: great film. Positive or negative?", "response": "positive"},
        {"task": "qa", "prompt": "Q: 2+2?\n\nResponse:", "response": "4"},
    ]
    path = tmp_path / "t0.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    examples = load_instructions(path)
    assert examples[0].prompt == "Review: great film. Positive or negative?\n\nResponse:"
    assert examples[1].prompt == "Q: 2+2?\n\nResponse:"
    assert [(e.task, e.response) for e in examples] == [("sentiment", "positive"), ("qa", "4")]


def test_prompt_completion(tmp_path):
    examples = load_instructions(_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say yes.", "completion": "yes"}]))
    assert examples == [Example("Say yes.\n\nResponse:", "yes")]


def test_self_instruct_gives_one_example_per_instance_named_by_task(tmp_path):
    row = {
        "id": "seed_task_7",
        "name": "antonyms",
        "instruction": "Give the antonym.",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
        "is_classification": False,
    }
    examples = load_instructions(_jsonl(tmp_path / "si.jsonl", [row]))
    assert [(e.prompt, e.response, e.task) for e in examples] == [
        ("Instruction: Give the antonym.\n\nInput: hot\n\nResponse:", "cold", "antonyms"),
        ("Instruction: Give the antonym.\n\nInput: up\n\nResponse:", "down", "antonyms"),
    ]


def test_explicit_format_and_limit(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    examples = load_instructions(_jsonl(tmp_path / "x.jsonl", rows), fmt="prompt_response", limit=3)
    assert [e.response for e in examples] == ["r0", "r1", "r2"]


def test_detection_prefers_the_most_specific_layout():
    assert detect_format({"instruction": "i", "instances": []}) == "self_instruct"
    assert detect_format({"instruction": "i", "context": "", "response": "r"}) == "dolly"
    assert detect_format({"instruction": "i", "input": "", "output": "o"}) == "alpaca"
    assert detect_format({"prompt": "p", "response": "r", "task": "t"}) == "prompt_response"


def test_unknown_layout_lists_the_accepted_field_sets(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        UserError,
        match=r"Unknown instruction layout with fields answer, question.*dolly: context, instruction, response",
    ):
        load_instructions(path)


def test_a_row_missing_its_format_fields_is_named(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p2"}])
    with pytest.raises(UserError, match="row 2 does not match its format"):
        load_instructions(path)


def test_missing_and_empty_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Instruction file .*none.jsonl does not exist"):
        load_instructions(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no instruction examples"):
        load_instructions(tmp_path / "empty.jsonl")


def test_offline_dataset_name_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not be loaded.*pass a local file or folder path"):
        load_hf_instructions("made-up-user-zz/no-such-instructions")


def test_references_default_to_the_response():
    assert Example("p", "r").references == ("r",)
    assert Example("p", "r", references=["a", "b"]).references == ("a", "b")


def _examples_over_tasks(n_tasks=20, per_task=3):
    return [
        Example(f"p{t}-{i}", f"r{t}-{i}", task=f"task{t}") for t in range(n_tasks) for i in range(per_task)
    ]


def test_split_by_task_holds_out_whole_tasks_deterministically():
    examples = _examples_over_tasks()
    seen, unseen = split_by_task(examples, unseen_fraction=0.2, seed=0)
    assert len({e.task for e in unseen}) == 4
    assert not {e.task for e in seen} & {e.task for e in unseen}
    assert sorted(seen + unseen, key=examples.index) == examples
    assert split_by_task(examples, 0.2, seed=0) == (seen, unseen)
    assert split_by_task(examples, 0.2, seed=1) != (seen, unseen)


def test_split_by_task_needs_two_tasks():
    with pytest.raises(UserError, match="at least two task names"):
        split_by_task([Example("p", "r", task="only")])


def test_train_val_test_partitions_rows_and_keeps_duplicates_together():
    examples = _examples_over_tasks(50, 4) + [Example("dup", "same")] * 3
    train, val, test = train_val_test(examples, val=0.1, test=0.2, seed=0)
    assert len(train) + len(val) + len(test) == len(examples)
    assert sum(e.prompt == "dup" for e in train) in (0, 3)
    assert 0.05 < len(val) / len(examples) < 0.2 and 0.1 < len(test) / len(examples) < 0.3
    assert train_val_test(examples, val=0.1, test=0.2, seed=0) == (train, val, test)
