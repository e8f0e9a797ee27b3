"""Users' own data files (``data.path``, ``data.test-path``), read with ``datasets``.

Accepted: CSV / TSV, JSON / JSON Lines, Parquet (by suffix), or a folder written by
``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose ``train``
split is used). Nothing is downloaded: the builders read local files, and their Arrow
cache lives under fedpeft's cache folder.

Every problem is a :class:`~fedpeft.errors.ConfigError` naming the key, the file and
what was expected, raised by :func:`check_files` before a run starts (a missing file;
an unreadable one; an empty table; a missing column, listing the columns that exist;
a value of the wrong kind, with its row; a label column with one class).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError
from fedpeft.tasks.packages import cache_root

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""File suffix → ``datasets`` builder."""

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "{input_block}### Response:\n"
)
"""The Alpaca prompt (Taori et al., 2023), used when the tokenizer has no chat template
and ``data.prompt-template`` is empty."""


def read_table(path_text: str, key: str, cache_dir: str = "") -> Any:
    """The table at ``path_text`` as a ``datasets.Dataset``.

    Raises:
        ConfigError: naming ``key`` — the path does not exist, has an unknown suffix,
            cannot be parsed, or holds no rows.
    """
    import datasets

    path = pathlib.Path(path_text).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={path_text!r}: no such file or folder")
    kinds = "CSV (.csv, .tsv), JSON (.json, .jsonl), Parquet (.parquet) or a save_to_disk folder"
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise ConfigError(
                        f"{key}={path_text!r} is a DatasetDict without a 'train' split "
                        f"(splits: {', '.join(table)}); save the split to use, or name it 'train'"
                    )
                table = table["train"]
        else:
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(f"{key}={path_text!r}: unknown file type {path.suffix!r}; expected {kinds}")
            options: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            table = datasets.load_dataset(
                builder,
                data_files=str(path.resolve()),
                split="train",
                cache_dir=str(cache_root(cache_dir) / "datasets"),
                **options,
            )
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 — datasets/pyarrow/pandas raise many kinds
        cause = err.__cause__ or err  # datasets wraps the parser's error in a generic one
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in first or "No columns to parse" in first:
            raise ConfigError(f"{key}={path_text!r} holds no rows") from err  # header only / empty
        raise ConfigError(f"{key}={path_text!r} cannot be read as {kinds} ({first})") from err
    if len(table) == 0:
        raise ConfigError(f"{key}={path_text!r} holds no rows")
    return table


def require_columns(table: Any, columns: Mapping[str, str], path: str) -> None:
    """Each ``{column: the key that named it}`` exists in ``table``.

    Raises:
        ConfigError: naming the key, the missing column and the columns that exist.
    """
    have = list(table.column_names)
    for column, key in columns.items():
        if column not in have:
            raise ConfigError(
                f"{key}={column!r}: {path!r} has no column {column!r}; its columns: {', '.join(have)}"
            )


def text_values(table: Any, column: str, key: str, path: str) -> list[str]:
    """The column's values, each a string.

    Raises:
        ConfigError: the first row whose value is not a string (empty cells included).
    """
    values = table[column]
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}={column!r}: row {row} of {path!r} is {value!r} "
                f"({type(value).__name__}), not text"
            )
    return values


def label_values(table: Any, column: str, key: str, path: str) -> list[str]:
    """The label column as strings (labels may be strings or integers).

    Raises:
        ConfigError: an empty cell or a value that is neither a string nor an integer.
    """
    out = []
    for row, value in enumerate(table[column]):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(
                f"{key}={column!r}: row {row} of {path!r} is {value!r} "
                f"({type(value).__name__}); labels must be strings or integers"
            )
        out.append(str(value))
    return out


def label_set(values: Sequence[str]) -> list[str]:
    """The distinct labels in a stable order: numerically when every label is an
    integer, else alphabetically (the order of the classifier's outputs)."""
    distinct = set(values)
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


@dataclass(frozen=True)
class ClassificationRows:
    """A classification table read from the user's files.

    Attributes:
        texts: the pool's texts (``data.path``) followed by the test file's, if any.
        labels: each text's label, as a string.
        groups: each text's value of ``data.group-column`` (``""`` without one).
        test_count: how many of the last rows come from ``data.test-path`` (0: none).
    """

    texts: list[str]
    labels: list[str]
    groups: list[str]
    test_count: int


def _paths(cfg: RunConfig) -> list[tuple[str, str]]:
    data = cfg.data
    return [("data.path", data.path)] + ([("data.test-path", data.test_path)] if data.test_path else [])


def read_classification(cfg: RunConfig) -> ClassificationRows:
    """Texts, labels and groups of ``data.path`` (then ``data.test-path``).

    Raises:
        ConfigError: a file problem (:func:`read_table`), a missing column, a non-text
            value, or a label column with fewer than two classes in ``data.path``.
    """
    data = cfg.data
    texts: list[str] = []
    labels: list[str] = []
    groups: list[str] = []
    test_count = 0
    for key, path in _paths(cfg):
        table = read_table(path, key, cfg.model.cache_dir)
        columns = {data.text_column: "data.text-column", data.label_column: "data.label-column"}
        if data.group_column and key == "data.path":
            columns[data.group_column] = "data.group-column"
        require_columns(table, columns, path)
        rows_texts = text_values(table, data.text_column, "data.text-column", path)
        rows_labels = label_values(table, data.label_column, "data.label-column", path)
        if key == "data.path":
            classes = label_set(rows_labels)
            if len(classes) < 2:
                raise ConfigError(
                    f"data.label-column={data.label_column!r}: {path!r} has one class "
                    f"({classes[0]!r}); a classifier needs at least two"
                )
            rows_groups = (
                [str(g) for g in table[data.group_column]] if data.group_column else [""] * len(table)
            )
        else:
            unseen = sorted(set(rows_labels) - set(labels))
            if unseen:
                raise ConfigError(
                    f"data.test-path={path!r} has labels the training data lacks: "
                    f"{', '.join(map(repr, unseen[:5]))}; labels of data.path: "
                    f"{', '.join(map(repr, label_set(labels)))}"
                )
            rows_groups = [""] * len(table)
            test_count = len(table)
        texts += rows_texts
        labels += rows_labels
        groups += rows_groups
    return ClassificationRows(texts, labels, groups, test_count)


@dataclass(frozen=True)
class InstructionRow:
    """One instruction-tuning example: the conversation before the answer, the answer.

    Attributes:
        prompt: ``[{"role", "content"}, ...]`` up to the answer (for a chat template),
            or for an Alpaca row the user turn built from instruction and input.
        answer: the response the loss is computed on.
        fields: the Alpaca fields (``instruction``, ``input``) for a prompt template;
            empty for a ``messages`` row.
        group: the row's ``data.group-column`` value (``""`` without one).
    """

    prompt: list[dict[str, str]]
    answer: str
    fields: dict[str, str]
    group: str


def read_instructions(cfg: RunConfig) -> tuple[list[InstructionRow], int]:
    """The rows of ``data.path`` (then ``data.test-path``) and how many come from the
    test file. A table has either a ``messages`` column (a list of ``{"role",
    "content"}`` turns ending with an ``assistant`` turn: the answer) or Alpaca columns
    ``instruction`` and ``output`` (``input`` optional).

    Raises:
        ConfigError: a file problem, neither format's columns, or a row that breaks it.
    """
    rows: list[InstructionRow] = []
    test_count = 0
    for key, path in _paths(cfg):
        table = read_table(path, key, cfg.model.cache_dir)
        group_column = cfg.data.group_column if key == "data.path" else ""
        if group_column:
            require_columns(table, {group_column: "data.group-column"}, path)
        groups = [str(g) for g in table[group_column]] if group_column else [""] * len(table)
        names = set(table.column_names)
        if "messages" in names:
            part = [_chat_row(m, i, path, g) for i, (m, g) in enumerate(zip(table["messages"], groups, strict=True))]
        elif {"instruction", "output"} <= names:
            instructions = text_values(table, "instruction", key, path)
            outputs = text_values(table, "output", key, path)
            inputs = text_values(table, "input", key, path) if "input" in names else [""] * len(table)
            part = [
                InstructionRow(
                    prompt=[{"role": "user", "content": f"{ins}\n\n{inp}" if inp else ins}],
                    answer=out,
                    fields={"instruction": ins, "input": inp},
                    group=g,
                )
                for ins, inp, out, g in zip(instructions, inputs, outputs, groups, strict=True)
            ]
        else:
            raise ConfigError(
                f"{key}={path!r}: an instruction dataset needs a 'messages' column (chat turns) "
                f"or 'instruction' and 'output' columns ('input' optional, Alpaca style); "
                f"its columns: {', '.join(table.column_names)}"
            )
        if key == "data.test-path":
            test_count = len(part)
        rows += part
    return rows, test_count


def _chat_row(messages: Any, row: int, path: str, group: str) -> InstructionRow:
    where = f"data.path: row {row} of {path!r}"
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise ConfigError(
            f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} turns, "
            f"got {str(messages)[:80]!r}"
        )
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            f"{where}: the last turn of 'messages' must be the assistant's answer (the loss is "
            f"computed on it), got role {messages[-1]['role']!r}"
        )
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return InstructionRow(prompt=turns[:-1], answer=turns[-1]["content"], fields={}, group=group)


def render_template(template: str, fields: Mapping[str, str]) -> str:
    """``data.prompt-template`` filled with a row's ``{instruction}`` and ``{input}``.

    Raises:
        ConfigError: the template names another field or is malformed.
    """
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"data.prompt-template={template!r} cannot be filled ({err!r}); it may use "
            "{instruction} and {input} (write {{ and }} for literal braces)"
        ) from err


def alpaca_prompt(fields: Mapping[str, str]) -> str:
    """The Alpaca prompt of a row (with or without its input)."""
    inp = fields.get("input", "")
    return ALPACA_TEMPLATE.format(
        with_input=", paired with an input that provides further context" if inp else "",
        instruction=fields.get("instruction", ""),
        input_block=f"### Input:\n{inp}\n\n" if inp else "",
    )


def check_files(cfg: RunConfig) -> None:
    """Read and check the user's files of ``cfg`` (nothing when ``data.path`` is empty).

    Raises:
        ConfigError: the first problem found.
    """
    if not cfg.data.path:
        return
    if cfg.task.name not in ("classification", "causal-lm"):
        raise ConfigError(
            f"data.path is read by task.name 'classification' or 'causal-lm', not {cfg.task.name!r} "
            "(the synthetic task generates its data)"
        )
    if cfg.task.name == "classification":
        read_classification(cfg)
    elif cfg.task.name == "causal-lm":
        rows, _ = read_instructions(cfg)
        if cfg.data.prompt_template:
            for row in rows:
                if row.fields:
                    render_template(cfg.data.prompt_template, row.fields)
                    break
