"""Data files checked before the split: every question once (a repeat could be held out and trained on at once),
none empty. In-process and fast."""

import json

import pytest

from common.data import load_task


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def questions(split) -> set[str]:
    return {e["question"].strip() for e in split}


def test_a_file_of_one_row_repeated_is_one_question_too_few_to_split(tmp_path, capsys):
    path = jsonl(tmp_path / "same.jsonl", [{"question": "What is 2+3?", "answer": "5"}] * 10_000)
    with pytest.raises(SystemExit, match="same.jsonl: needs at least 3 examples to split, found 1$"):
        load_task(path)
    assert f"warning: --task {path}: dropping 9999 rows that repeat an earlier row's" in capsys.readouterr().out


def test_repeated_questions_are_dropped_before_the_split(tmp_path, capsys):
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(100)]
    repeats = [{"question": f"  What is {i}+1?\n", "answer": f"{i + 1}.0"} for i in range(0, 100, 3)]  # 34
    task = load_task(jsonl(tmp_path / "some.jsonl", rows + repeats + rows[:6]))
    assert "dropping 40 rows that repeat an earlier row's question" in capsys.readouterr().out
    train, held_out = questions(task.train), questions(task.validation) | questions(task.test)
    assert len(task.train) + len(task.validation) + len(task.test) == 100 == len(train | held_out)
    assert not train & held_out, "no held-out question is also a train one"
    assert all(e["question"] == f"What is {int(e['answer']) - 1}+1?" for e in task.train), "the first row is kept"


def test_a_file_without_repeats_loads_without_a_warning(tmp_path, capsys):
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(40)]
    task = load_task(jsonl(tmp_path / "unique.jsonl", rows))
    assert len(task.train) + len(task.validation) + len(task.test) == 40 and "warning" not in capsys.readouterr().out


def test_a_repeat_with_another_answer_is_an_error_naming_both_rows(tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(40)]
    path = jsonl(tmp_path / "conflict.jsonl", rows + [{"question": "What is 6+1?", "answer": "8"}])
    with pytest.raises(SystemExit, match="conflict.jsonl: line 41 asks the question of line 7 again, with another"):
        load_task(path)


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_an_empty_question_is_a_one_line_error_naming_its_row(empty, tmp_path):
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(40)]
    rows[12]["problem"] = rows[30]["problem"] = empty
    with pytest.raises(SystemExit) as error:
        load_task(jsonl(tmp_path / "empty.jsonl", rows), question_field="problem")
    message = str(error.value.code)
    assert "\n" not in message and message.startswith("error: --task "), message
    assert "2 row(s) have an empty 'problem' (the first: line 13" in message


def test_repeats_are_dropped_in_every_file_form(tmp_path, capsys):
    rows = [{"question": f"q{i % 20}", "answer": str(i % 20)} for i in range(40)]
    (tmp_path / "columns.json").write_text(json.dumps({k: [r[k] for r in rows] for k in ("question", "answer")}))
    task = load_task(str(tmp_path / "columns.json"))
    assert len(task.train) + len(task.validation) + len(task.test) == 20
    assert "dropping 20 rows" in capsys.readouterr().out


def test_gsm8k_keeps_its_own_split(monkeypatch):
    """GSM8K is split as published (the file checks are for local files): a stand-in for the download, repeats and
    all, comes back with every row."""
    datasets = pytest.importorskip("datasets")
    train = [{"question": "Q?" if i % 2 else f"Q{i}?", "answer": f"so {i} #### {i:,}"} for i in range(400)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: {"train": train, "test": train[:5]})
    task = load_task("gsm8k")
    assert (len(task.train), len(task.validation), len(task.test)) == (100, 300, 5)
    assert task.test[3] == {"question": "Q?", "answer": "3", "solution": "so 3 #### 3"}
