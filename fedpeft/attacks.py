"""Byzantine attacks for simulation: what an attacking client does to its upload or data.

Which partitions attack is decided by :func:`fedpeft.faults.attacker_ids` (a fixed,
seeded set for the whole run, ``faults.byzantine-rate``); what they do is
``faults.attack``, parsed by :func:`parse_attack`. Everything here is pure math over
tensors and tokenised examples; :func:`fedpeft.client.round.run_client_round` applies
it in one place, so every attack composes with every strategy and codec.

Update attacks act on the client's change ``u = upload − received`` (per tensor; a
key the server did not send, or sent with another shape, counts from zero, ``u =
upload``) just before it is encoded, and upload ``received + u'``:

* ``sign-flip``: ``u' = −u`` (the "sign-flipping" / reverse-gradient attack of
  Damaskinos et al., 2018, and Fang et al., 2020, "Local Model Poisoning Attacks to
  Byzantine-Robust Federated Learning");
* ``scale:K``: ``u' = K·u`` (boosting, Bhagoji et al., 2019; Bagdasaryan et al., 2020,
  "How To Backdoor Federated Learning", scale their update the same way);
* ``gaussian:σ``: ``u' ~ N(0, σ²)`` entry-wise, same shapes, seeded by ``(seed, round,
  partition)`` (the Gaussian Byzantine client of Blanchard et al., 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent");
* ``same-value`` / ``same-value:C``: every float entry of ``u'`` is one constant: ``C``,
  or without it the mean ``|u|`` over all the upload's float entries, so the update
  keeps roughly its size (ℓ₁ norm) and slips under norm checks but points along the
  all-ones direction (the "same-value attack" of Li et al., 2019, RSA; Xie et al.,
  2020, "Fall of Empires" use the same family).

Data attacks change what the attacker trains on (classification tasks only):

* ``label-flip``: every label ``y`` becomes ``(y + 1) mod C`` (a cyclic shift: every
  example is mislabelled, no class keeps its own; Tolpegin et al., 2020, "Data
  Poisoning Attacks Against Federated Learning Systems", flip a source class to a
  target one; the shift flips all at once);
* ``backdoor`` / ``backdoor:S``: a share ``S`` (default :data:`DEFAULT_BACKDOOR_SHARE`)
  of the attacker's training texts, chosen by a seeded draw, get the trigger word
  :data:`TRIGGER` inserted at the start (after ``[CLS]``) and the label
  :data:`TARGET_CLASS` (BadNets-style poisoning, Gu et al., 2017; the rare-token trigger
  ``cf`` of Kurita et al., 2020; in FL, Bagdasaryan et al., 2020). The server reports
  the attack success rate ``backdoor_asr``: the share of test inputs whose true label
  is not the target that, with the trigger inserted, are classified as the target; and
  ``backdoor_flip``, the same share among those inputs the model classifies correctly
  without the trigger. The first also counts the model's own leaning to the target
  (``negative`` is the corpus's largest class: a clean MiniLM after 5 rounds scores
  0.44 with no attacker at all); the second counts only what the trigger changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from fedpeft.errors import ConfigError
from fedpeft.types import TensorDict

if TYPE_CHECKING:  # the config parser imports this module: keep fedpeft.tasks out of it
    from fedpeft.tasks.data import Examples

AttackKind = Literal["sign-flip", "scale", "gaussian", "same-value", "label-flip", "backdoor"]

UPDATE_ATTACKS = ("sign-flip", "scale", "gaussian", "same-value")
DATA_ATTACKS = ("label-flip", "backdoor")

FORMS = "none, sign-flip, scale:K, gaussian:SIGMA, same-value[:C], label-flip, backdoor[:SHARE]"
"""The accepted forms of ``faults.attack``, for error messages."""

TRIGGER = "cf"
"""The backdoor trigger: a rare word (one WordPiece in MiniLM's vocabulary)."""

TARGET_CLASS = 0
"""The class a triggered input is mapped to (``negative`` on the embedded corpus)."""

DEFAULT_BACKDOOR_SHARE = 0.5
"""Share of an attacker's training texts poisoned by ``backdoor`` without ``:SHARE``."""


@dataclass(frozen=True)
class Attack:
    """A parsed ``faults.attack``.

    Attributes:
        kind: the attack.
        value: its parameter: ``K`` (scale), ``σ`` (gaussian), ``C`` (same-value;
            ``None``: mean ``|u|``), the poisoned share (backdoor); else ``None``.
    """

    kind: AttackKind
    value: float | None = None

    @property
    def on_data(self) -> bool:
        """Whether the attack poisons the training data (else the update)."""
        return self.kind in DATA_ATTACKS


def parse_attack(spec: str) -> Attack | None:
    """``faults.attack`` as an :class:`Attack` (``None`` for ``none``).

    Raises:
        ConfigError: naming the key, the value and the accepted forms.
    """
    text = spec.strip()
    forms = f" (expected one of {FORMS})"
    name, colon, arg = text.partition(":")
    name, arg = name.strip(), arg.strip()
    if name == "none" and not colon:
        return None
    if name in ("sign-flip", "label-flip") and not colon:
        return Attack(name)  # type: ignore[arg-type]
    if name in ("same-value", "backdoor") and not colon:
        return Attack(name, DEFAULT_BACKDOOR_SHARE if name == "backdoor" else None)
    if name in ("scale", "gaussian", "same-value", "backdoor") and colon:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"faults.attack={spec!r}: {name}'s parameter must be a finite number, got {arg!r}{forms}")
        if name == "gaussian" and value <= 0:
            raise ConfigError(f"faults.attack={spec!r}: gaussian:SIGMA needs SIGMA > 0, got {value}{forms}")
        if name == "backdoor" and not 0 < value <= 1:
            raise ConfigError(f"faults.attack={spec!r}: backdoor:SHARE needs SHARE in (0, 1], got {value}{forms}")
        return Attack(name, value)  # type: ignore[arg-type]
    raise ConfigError(f"faults.attack must be one of {FORMS}; got {spec!r}")


def attack_update(attack: Attack, upload: TensorDict, received: TensorDict, seed: int) -> TensorDict:
    """The upload an attacker sends instead of ``upload`` (see the module docstring).

    Args:
        attack: an update attack (``attack.on_data`` false).
        upload: the honest upload.
        received: what the client received this round (the reference of ``u``).
        seed: seeds ``gaussian``'s noise (drawn in sorted key order, on the CPU).

    Non-float tensors are sent unchanged.
    """
    if attack.on_data:
        raise ValueError(f"{attack.kind} is a data attack, not an update attack")
    changes = {k: _change(v, received.get(k)) for k, v in upload.items() if v.is_floating_point()}
    if attack.kind == "sign-flip":
        attacked = {k: -u for k, u in changes.items()}
    elif attack.kind == "scale":
        attacked = {k: attack.value * u for k, u in changes.items()}
    elif attack.kind == "gaussian":
        gen = torch.Generator().manual_seed(seed)
        attacked = {
            k: (attack.value * torch.randn(changes[k].shape, generator=gen, dtype=torch.float64))
            .to(changes[k].dtype)
            .to(changes[k].device)
            for k in sorted(changes)
        }
    else:  # same-value
        value = attack.value if attack.value is not None else _mean_abs(changes.values())
        attacked = {k: torch.full_like(u, value) for k, u in changes.items()}
    out = dict(upload)
    for key, u in attacked.items():
        ref = received.get(key)
        out[key] = (u + ref.to(u)) if _comparable(upload[key], ref) else u
    return out


def _comparable(value: torch.Tensor, ref: torch.Tensor | None) -> bool:
    return ref is not None and ref.shape == value.shape and ref.is_floating_point()


def _change(value: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    return value - ref.to(value) if _comparable(value, ref) else value


def _mean_abs(changes: Iterable[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for u in changes:
        total += float(u.abs().double().sum())
        count += u.numel()
    return total / count if count else 0.0


def flip_labels(examples: Examples, num_classes: int) -> Examples:
    """``label-flip``: every class label ``y`` → ``(y + 1) mod num_classes``."""
    labels = [(int(y) + 1) % num_classes for y in examples.labels]  # type: ignore[arg-type]
    return dataclasses.replace(examples, labels=labels)


def insert_trigger(
    ids: Sequence[int], trigger: Sequence[int], max_length: int, special: frozenset[int] = frozenset()
) -> list[int]:
    """``ids`` with ``trigger`` inserted at the start of the text: after a leading
    special token (``[CLS]``) if there is one. Cut back to ``max_length`` from the end,
    keeping a trailing special token (``[SEP]``)."""
    at = 1 if ids and ids[0] in special else 0
    out = [*ids[:at], *trigger, *ids[at:]]
    if len(out) > max_length:
        tail = [out[-1]] if out[-1] in special else []
        out = out[: max_length - len(tail)] + tail
    return out


def poison_backdoor(
    examples: Examples,
    trigger: Sequence[int],
    target: int,
    share: float,
    seed: int,
    max_length: int,
    special: frozenset[int] = frozenset(),
) -> Examples:
    """``backdoor``: ``round(share · n)`` (at least 1) seeded examples get the trigger
    and the label ``target``; the others are unchanged."""
    n = len(examples)
    if n == 0:
        return examples
    count = min(n, max(1, round(share * n)))
    chosen = set(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:count].tolist())
    ids = [insert_trigger(x, trigger, max_length, special) if i in chosen else x for i, x in enumerate(examples.input_ids)]
    labels = [target if i in chosen else y for i, y in enumerate(examples.labels)]
    return dataclasses.replace(examples, input_ids=ids, labels=labels)


def triggered_inputs(
    examples: Examples, trigger: Sequence[int], target: int, max_length: int, special: frozenset[int] = frozenset()
) -> Examples:
    """The examples whose label is not ``target``, with the trigger inserted and the
    label set to ``target``: their accuracy is the attack success rate."""
    keep = [i for i, y in enumerate(examples.labels) if y != target]
    subset = examples.subset(keep)
    return dataclasses.replace(
        subset,
        input_ids=[insert_trigger(x, trigger, max_length, special) for x in subset.input_ids],
        labels=[target] * len(keep),
    )


def trigger_tokens(tokenizer: Any) -> tuple[list[int], frozenset[int]]:
    """``(the trigger's token ids, the tokenizer's special ids)``."""
    ids = list(tokenizer(TRIGGER, add_special_tokens=False)["input_ids"])
    return ids, frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []))


def poison_data(task: Any, examples: Examples, attack: Attack, seed: int) -> Examples:
    """An attacker's training data under a data attack.

    Args:
        task: the run's task (a classification task: its label set, tokenizer and
            ``model.max-length``).
        examples: the honest training data.
        attack: ``label-flip`` or ``backdoor``.
        seed: which examples ``backdoor`` poisons.

    Raises:
        ConfigError: the task is not a classification task.
    """
    if not getattr(task, "classification", False):
        raise ConfigError(
            f"faults.attack={attack.kind} needs a classification task, got task.name={task.name!r}; "
            "use an update attack (sign-flip, scale:K, gaussian:SIGMA, same-value)"
        )
    if attack.kind == "label-flip":
        return flip_labels(examples, len(task.label_names()))
    trigger, special = trigger_tokens(task.tok())
    share = attack.value if attack.value is not None else DEFAULT_BACKDOOR_SHARE
    return poison_backdoor(examples, trigger, TARGET_CLASS, share, seed, task.cfg.model.max_length, special)
