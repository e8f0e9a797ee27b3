"""``Task``: a model, its data and its loss, shared by server and clients.

A task knows how to build its peft model (cached once per process per rank), load
and tokenise its corpus (cached once per process), split it into a seeded held-out
test set and per-client partitions, and compute its loss. Subclasses provide the
corpus, the base model and the loss; everything else is here.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedpeft.config import RunConfig
from fedpeft.lora.peft_io import AdapterLayout
from fedpeft.seeding import derive_seed
from fedpeft.tasks.data import (
    SPLIT_VERSION,
    Examples,
    all_partition_indices,
    drop_test_copies,
    holdout_split,
    label_histogram,
    partition_indices,
)
from fedpeft.tasks.device import DTYPES, check_quantization, quantization_config, resolve_device
from fedpeft.tasks.logit_adjust import adjusted_cross_entropy, log_prior
from fedpeft.tasks.model import AdapterModel, cached, seeded
from fedpeft.tasks.packages import cache_root
from fedpeft.tasks.train import PenaltyFn, StepFn, TrainResult, evaluate, local_train, predict

PARTITIONS_BUILT: Counter[tuple[int, int]] = Counter()
"""How often each ``(partition_id, num_partitions)`` was materialised in this process
(on a miss of the in-memory cache, whether or not the disk cache then had it)."""


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (they flood client logs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _atomic_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_examples(path: pathlib.Path, ex: Examples) -> None:
    """Examples as flat int arrays with offsets (token labels share the id offsets)."""
    lengths = np.array([len(s) for s in ex.input_ids], dtype=np.int64)
    arrays = {
        "ids": np.concatenate([np.asarray(s, np.int32) for s in ex.input_ids]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "groups": np.asarray(ex.groups, np.int64),
        "label_ids": np.asarray(ex.label_ids, np.int64),
    }
    if ex.labels and isinstance(ex.labels[0], list):
        arrays["token_labels"] = np.concatenate([np.asarray(s, np.int64) for s in ex.labels])  # type: ignore[arg-type]
    else:
        arrays["labels"] = np.asarray(ex.labels, np.int64)
    _atomic_npz(path, **arrays)


def _read_examples(path: pathlib.Path) -> Examples:
    z = np.load(path)
    cuts = z["offsets"][1:-1]
    ids = [a.tolist() for a in np.split(z["ids"], cuts)]
    if "token_labels" in z:
        labels: Any = [a.tolist() for a in np.split(z["token_labels"], cuts)]
    else:
        labels = z["labels"].tolist()
    return Examples(input_ids=ids, labels=labels, groups=z["groups"].tolist(), label_ids=z["label_ids"].tolist())


class Task:
    """Base class; see :class:`~fedpeft.tasks.classification.Classification` and
    :class:`~fedpeft.tasks.causal_lm.CausalLM`.

    Args:
        cfg: the run config (only the task, model, lora, data, train and eval
            sections are read).
    """

    name = ""
    classification = False
    default_model = ""
    default_targets: tuple[str, ...] = ()
    default_test_size = 0

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.model_name = cfg.model.name or self.default_model
        self.targets = (
            tuple(t.strip() for t in cfg.lora.target_modules.split(",") if t.strip())
            or self.default_targets
        )

    @property
    def user_data(self) -> bool:
        """Whether the run reads the user's files (``data.path``) instead of the
        embedded corpus."""
        return bool(self.cfg.data.path)

    @property
    def test_size(self) -> int:
        """Examples held out for the server's test set: ``data.test-size``, else the
        task's default, else (your own data) a tenth of it; with ``data.test-path``,
        that file's rows."""
        fixed = self.fixed_test_count()
        if fixed:
            return fixed
        if self.cfg.data.test_size:
            return self.cfg.data.test_size
        if self.user_data:
            return max(1, len(self.corpus()) // 10)
        return self.default_test_size

    def fixed_test_count(self) -> int:
        """How many of the corpus's last examples are ``data.test-path``'s (0: none)."""
        return 0

    # -- to implement -------------------------------------------------------------
    def tokenizer(self) -> Any:
        """The tokenizer (cached by the caller)."""
        raise NotImplementedError

    def load_corpus(self, tokenizer: Any) -> Examples:
        """Tokenise the whole corpus."""
        raise NotImplementedError

    def base_model(self) -> Any:
        """A fresh transformers model (weights from disk or random for tiny models)."""
        raise NotImplementedError

    def task_type(self) -> str:
        """peft task type."""
        raise NotImplementedError

    def loss(
        self, model: AdapterModel, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean loss, logits)`` of a batch."""
        out = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return out.loss, out.logits

    # -- shared machinery ---------------------------------------------------------
    def _source(self) -> tuple[Any, ...]:
        """What turns the user's rows into examples (empty for the embedded corpus)."""
        data = self.cfg.data
        if not self.user_data:
            return ()
        return (data.path, data.test_path, data.text_column, data.label_column, data.group_column,
                data.prompt_template)

    def _key(self, *parts: Any) -> tuple[Any, ...]:
        return (self.name, self.model_name, self.cfg.model.max_length, self.cfg.model.cache_dir, *parts,
                self._source())

    def tok(self) -> Any:
        """The task's tokenizer, loaded once per process."""
        return cached(self._key("tokenizer"), self.tokenizer)

    def corpus_sources(self) -> list[pathlib.Path]:
        """Files the tokenised corpus depends on (fingerprinted for the disk cache)."""
        return []

    def data_sources(self) -> list[pathlib.Path]:
        """The user's data files (every file of a ``save_to_disk`` folder)."""
        out = []
        for text in (self.cfg.data.path, self.cfg.data.test_path):
            if text:
                path = pathlib.Path(text).expanduser()
                out += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        return out

    def _corpus_key(self) -> str:
        parts: list[Any] = [self.name, self.model_name, self.cfg.model.max_length]
        if self.user_data:
            parts.append(self._source())
        for path in self.corpus_sources():
            stat = path.stat()
            parts.append((str(path), stat.st_size, stat.st_mtime_ns))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def corpus(self) -> Examples:
        """The whole tokenised corpus: once per process, and from a disk cache
        (``$FEDPEFT_CACHE/corpus-<key>.npz``) when an earlier process made it.

        Deployment starts a new ClientApp process per message, so tokenising 38k
        tweets in each one would dominate a round; the cache is keyed by the task,
        model, max length and the size and mtime of every source file.
        """

        def load() -> Examples:
            if not self.corpus_sources():
                return self.load_corpus(self.tok())
            path = cache_root(self.cfg.model.cache_dir) / f"corpus-{self._corpus_key()}.npz"
            if path.exists():
                try:
                    return _read_examples(path)
                except (OSError, ValueError, KeyError):
                    pass  # unreadable cache: rebuild it
            examples = self.load_corpus(self.tok())
            _write_examples(path, examples)
            return examples

        return cached(self._key("corpus"), load)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        seed = derive_seed(self.cfg.seed, "holdout")
        fixed = self.fixed_test_count()
        if fixed:  # data.test-path: the corpus's last rows, used whole
            n = len(self.corpus())
            return cached(
                self._key("split-file", fixed),
                lambda: drop_test_copies(np.arange(n - fixed), np.arange(n - fixed, n), self.corpus()),
            )
        return cached(
            self._key("split", self.test_size, seed),
            lambda: holdout_split(len(self.corpus()), self.test_size, seed, self.corpus()),
        )

    def _pool_split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(the clients' pool, the validation share)`` as corpus indices: with
        ``data.validation-size`` = v > 0, v seeded examples of the pool left after the
        test hold-out are set aside (pool copies of their texts dropped, as for the test
        set); with v = 0 the pool is the hold-out's and the share is empty."""
        pool, _ = self._split()
        size = self.cfg.data.validation_size
        if size == 0:
            return pool, pool[:0]
        seed = derive_seed(self.cfg.seed, "validation")

        def build() -> tuple[np.ndarray, np.ndarray]:
            keep, val = holdout_split(len(pool), size, seed, self.corpus().subset(pool.tolist()))
            return pool[keep], pool[val]

        return cached(self._key("validation", self.test_size, size, seed), build)

    def test_data(self) -> Examples:
        """The server's evaluation set: the held-out test set (seeded, disjoint from
        every partition; no pool example repeats a test example's tokens), or with
        ``eval.split=validation`` the validation share of the pool (for tuning)."""
        if self.cfg.eval.split == "validation":
            return self.corpus().subset(self._pool_split()[1].tolist())
        return self.corpus().subset(self._split()[1].tolist())

    def train_pool(self) -> Examples:
        """The examples left for the clients once the test set (and the validation
        share, if any) is held out (once per process; the lists share the corpus's
        token lists, so this costs only the index lists)."""
        return cached(
            self._key("pool", self.test_size, self.cfg.seed, self.cfg.data.validation_size),
            lambda: self.corpus().subset(self._pool_split()[0].tolist()),
        )

    def client_data(self, partition_id: int, num_partitions: int) -> tuple[Examples, Examples]:
        """``(train, local test)`` of one client; local test is empty unless
        ``eval.client`` is on.

        Lazy: a partition is built the first time its client trains in this process
        (counted in :data:`PARTITIONS_BUILT`) and kept; with 1,000 virtual clients of
        which 10 train per round, a worker only ever builds the ones it ran. The
        partition assignment itself is computed once per process (see
        :func:`~fedpeft.tasks.data.partition_indices`).
        """
        data_cfg = self.cfg.data

        def build() -> tuple[Examples, Examples]:
            pool = self.train_pool()
            idx = partition_indices(
                pool, partition_id, num_partitions, data_cfg, derive_seed(self.cfg.seed, "partition")
            )
            rng = np.random.Generator(
                np.random.PCG64(derive_seed(self.cfg.seed, "client-split", partition_id))
            )
            idx = [idx[i] for i in rng.permutation(len(idx))]
            n_test = int(len(idx) * data_cfg.client_test_fraction) if self.cfg.eval.client else 0
            test, train = idx[:n_test], idx[n_test:]
            if data_cfg.max_examples:
                train = train[: data_cfg.max_examples]
            self._last_indices = (np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64))
            return pool.subset(train), pool.subset(test)

        def build_cached() -> tuple[Examples, Examples]:
            PARTITIONS_BUILT[(partition_id, num_partitions)] += 1
            if not self.corpus_sources():
                return build()
            key = hashlib.sha256(
                repr((SPLIT_VERSION, self._corpus_key(), self.test_size, self.cfg.seed, partition_id,
                      num_partitions, data_cfg, self.cfg.eval.client)).encode()
            ).hexdigest()[:16]
            path = cache_root(self.cfg.model.cache_dir) / f"part-{key}.npz"
            pool_idx = self._pool_split()[0]
            whole = self.corpus()
            if path.exists():
                try:
                    z = np.load(path)
                    return whole.subset(z["train"].tolist()), whole.subset(z["test"].tolist())
                except (OSError, ValueError, KeyError):
                    pass
            train, test = build()
            # store indices into the whole corpus, found again by position in the pool
            train_idx, test_idx = self._last_indices
            _atomic_npz(path, train=pool_idx[train_idx], test=pool_idx[test_idx])
            return train, test

        return cached(
            self._key("client", partition_id, num_partitions, data_cfg, self.cfg.seed, self.cfg.eval.client),
            build_cached,
        )

    def label_names(self) -> list[str]:
        """Names of the coarse labels counted by :meth:`split_summary` (class names for
        classification, group names for causal LM); empty when unnamed."""
        return []

    def split_summary(self, num_partitions: int) -> dict[str, Any]:
        """What each client was dealt: partition sizes and label counts.

        Computed from the partition indices alone (no example is materialised, so the
        1,000-client lazy path stays lazy). Counts are of the whole partition, before a
        client sets aside its local test share (``eval.client``) or truncates to
        ``data.max-examples``. Also reports the test set's counts and how many pool
        examples were dropped as copies of test examples.
        """
        pool = self.train_pool()
        seed = derive_seed(self.cfg.seed, "partition")
        parts = all_partition_indices(pool, num_partitions, self.cfg.data, seed)
        clients = [
            {"partition_id": pid, "examples": len(idx), "labels": label_histogram(pool, idx)}
            for pid, idx in enumerate(parts)
        ]
        train_idx, test_idx = self._split()
        validation = self._pool_split()[1]
        return {
            "partition": self.cfg.data.partition,
            "alpha": self.cfg.data.alpha if self.cfg.data.partition == "dirichlet" else None,
            "label_names": self.label_names(),
            "pool": label_histogram(pool),
            "test": label_histogram(self.corpus(), test_idx.tolist()),
            "dropped_test_copies": len(self.corpus()) - len(train_idx) - len(test_idx),
            "validation": len(validation),
            "clients": clients,
        }

    def save_extras(self, directory: pathlib.Path) -> None:
        """Write what a user needs beside the saved adapter to use it (the label set
        of a classifier trained on their data); nothing by default."""

    def layout(self, rank: int) -> AdapterLayout:
        """Adapter layout facts for LoRA algebra."""
        return AdapterLayout(lora_alpha=self.cfg.lora.alpha, use_rslora=self.cfg.lora.rslora)

    def model(self, rank: int) -> AdapterModel:
        """The peft model with a rank-``rank`` adapter, built once per process.

        Its initial adapter (``.initial``) depends only on the run seed, so the
        server and every client build identical starting points.
        """
        placement = (self.cfg.train.device, self.cfg.model.dtype, self.cfg.model.quantization,
                     self.cfg.train.gradient_checkpointing)
        return cached(
            self._key("model", rank, self.targets, self.cfg.lora, self.cfg.seed, placement),
            lambda: self._build(rank),
        )

    def pretrained_options(self) -> dict[str, Any]:
        """``from_pretrained`` keywords for ``model.dtype`` and ``model.quantization``
        (bitsandbytes places a quantised model on its GPU itself)."""
        device = resolve_device(self.cfg.train.device)
        quantization = self.cfg.model.quantization
        check_quantization(quantization, device)
        options: dict[str, Any] = {"dtype": DTYPES[self.cfg.model.dtype]}
        if quantization != "none":
            options.update(quantization_config=quantization_config(quantization),
                           device_map={"": device.index or 0}, dtype=torch.bfloat16)
        return options

    def _build(self, rank: int) -> AdapterModel:
        from peft import LoraConfig, get_peft_model

        quiet_transformers()
        device = resolve_device(self.cfg.train.device)
        quantized = self.cfg.model.quantization != "none"
        with seeded(derive_seed(self.cfg.seed, "init")):
            base = self.base_model()
            if quantized:
                from peft import prepare_model_for_kbit_training

                base = prepare_model_for_kbit_training(
                    base, use_gradient_checkpointing=self.cfg.train.gradient_checkpointing
                )
            else:
                base = base.to(DTYPES[self.cfg.model.dtype])  # a no-op when loaded so
            if self.cfg.train.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if hasattr(base.config, "use_cache"):
                    base.config.use_cache = False  # the KV cache does not mix with recomputation
            lora = LoraConfig(
                r=rank,
                lora_alpha=self.cfg.lora.alpha,
                lora_dropout=self.cfg.lora.dropout,
                # peft's "all-linear" is a string, not a module name
                target_modules="all-linear" if self.targets == ("all-linear",) else list(self.targets),
                use_rslora=self.cfg.lora.rslora,
                task_type=self.task_type(),
            )
            peft_model = get_peft_model(base, lora)
        if not quantized:
            peft_model.to(device)
        peft_model.eval()
        tok = self.tok()
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return AdapterModel(peft_model, pad_id=int(pad), layout=self.layout(rank))

    def train(
        self,
        model: AdapterModel,
        data: Examples,
        trainable: frozenset[str],
        seed: int,
        penalty: PenaltyFn | None = None,
        on_step: StepFn | None = None,
    ) -> TrainResult:
        """One round of local training (see :func:`fedpeft.tasks.train.local_train`);
        with ``train.logit-adjust`` the classification loss is adjusted by this
        client's label prior (:mod:`fedpeft.tasks.logit_adjust`)."""
        loss_fn = self.loss
        tau = self.cfg.train.logit_adjust
        if tau > 0 and self.classification:
            prior = log_prior(data.labels, len(self.label_names()))

            def loss_fn(m: AdapterModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                out = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return adjusted_cross_entropy(out.logits, batch["labels"], prior, tau), out.logits

        return local_train(model, data, self.cfg.train, trainable, loss_fn, seed, penalty, on_step)

    def evaluate(self, model: AdapterModel, data: Examples) -> dict[str, float]:
        """Loss and accuracy (classification) or perplexity (causal LM)."""
        return evaluate(
            model, data, self.cfg.eval.batch_size, self.loss, self.classification, self.cfg.train.precision
        )

    def predict(self, model: AdapterModel, data: Examples) -> np.ndarray:
        """Each example's predicted class, in ``data``'s order (classification), from
        the same batches and precision as :meth:`evaluate`."""
        return predict(model, data, self.cfg.eval.batch_size, self.loss, self.cfg.train.precision)
