"""Byzantine attacks (fedpeft.attacks, faults.byzantine-rate / faults.attack): closed
forms on small tensors, the seeded attacker set, the data transforms, and their effect
on tiny in-process runs."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.attacks import (
    Attack,
    attack_update,
    flip_labels,
    insert_trigger,
    parse_attack,
    poison_backdoor,
    poison_data,
    triggered_inputs,
)
from fedpeft.config import FaultConfig, parse_run_config
from fedpeft.errors import ConfigError
from fedpeft.faults import attacker_ids, client_attack
from fedpeft.tasks.data import Examples

RECEIVED = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0, 1.0])}
UPLOAD = {
    "a": torch.tensor([[2.0, 0.0], [3.0, 5.0]]),  # u = [[1, -2], [0, 1]]
    "b": torch.tensor([0.5, 1.5]),  # u = [-0.5, 0.5]
    "new": torch.tensor([2.0, -4.0]),  # not received: u = upload
    "count": torch.tensor([7]),  # not a float: sent unchanged
}
CHANGE = {"a": UPLOAD["a"] - RECEIVED["a"], "b": UPLOAD["b"] - RECEIVED["b"], "new": UPLOAD["new"]}


def _sent_change(out):
    return {k: out[k] - RECEIVED.get(k, torch.zeros_like(out[k])) for k in CHANGE}


# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", None),
        ("sign-flip", Attack("sign-flip")),
        ("scale:5", Attack("scale", 5.0)),
        ("scale:-2.5", Attack("scale", -2.5)),
        ("gaussian:0.1", Attack("gaussian", 0.1)),
        ("same-value", Attack("same-value", None)),
        ("same-value:1", Attack("same-value", 1.0)),
        ("label-flip", Attack("label-flip")),
        ("backdoor", Attack("backdoor", 0.5)),
        ("backdoor:0.2", Attack("backdoor", 0.2)),
    ],
)
def test_attack_forms_parse(spec, expected):
    assert parse_attack(spec) == expected
    assert parse_run_config({"faults.attack": spec}).faults.attack == spec


@pytest.mark.parametrize(
    "spec", ["signflip", "scale", "scale:x", "scale:inf", "gaussian:0", "gaussian:-1", "backdoor:0",
             "backdoor:1.5", "sign-flip:2", "label-flip:0.3", "none:1", ""],
)
def test_malformed_attack_is_refused_naming_key_and_forms(spec):
    with pytest.raises(ConfigError, match=r"faults\.attack.*sign-flip, scale:K, gaussian:SIGMA"):
        parse_run_config({"faults.attack": spec})


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_byzantine_rate_out_of_range_is_refused(rate):
    with pytest.raises(ConfigError, match=rf"faults\.byzantine-rate must be in \[0, 1\], got {rate}"):
        parse_run_config({"faults.byzantine-rate": rate, "faults.attack": "sign-flip"})


# -- update attacks: closed forms ------------------------------------------------------


def test_sign_flip_negates_the_change():
    out = attack_update(Attack("sign-flip"), UPLOAD, RECEIVED, seed=0)
    for key, u in _sent_change(out).items():
        torch.testing.assert_close(u, -CHANGE[key])
    torch.testing.assert_close(out["a"], torch.tensor([[0.0, 4.0], [3.0, 3.0]]))
    assert torch.equal(out["count"], UPLOAD["count"])


def test_scale_multiplies_the_change():
    out = attack_update(Attack("scale", 3.0), UPLOAD, RECEIVED, seed=0)
    for key, u in _sent_change(out).items():
        torch.testing.assert_close(u, 3.0 * CHANGE[key])
    torch.testing.assert_close(out["b"], torch.tensor([-0.5, 2.5]))


def test_gaussian_replaces_the_change_by_seeded_noise():
    big_up = {"w": torch.ones(200, 100), "small": torch.zeros(3)}
    big_rec = {"w": torch.full((200, 100), 5.0), "small": torch.zeros(3)}
    out = attack_update(Attack("gaussian", 0.5), big_up, big_rec, seed=1)
    noise = out["w"] - big_rec["w"]
    assert noise.shape == (200, 100) and out["small"].shape == (3,)
    assert abs(float(noise.std()) - 0.5) < 0.02 and abs(float(noise.mean())) < 0.02
    again = attack_update(Attack("gaussian", 0.5), big_up, big_rec, seed=1)
    other = attack_update(Attack("gaussian", 0.5), big_up, big_rec, seed=2)
    assert torch.equal(out["w"], again["w"]) and not torch.equal(out["w"], other["w"])
    # the noise does not depend on the honest change
    shifted = attack_update(Attack("gaussian", 0.5), {**big_up, "w": big_up["w"] * 9}, big_rec, seed=1)
    assert torch.equal(shifted["w"], out["w"])


def test_same_value_sets_every_entry_to_the_mean_absolute_change_or_a_constant():
    out = attack_update(Attack("same-value"), UPLOAD, RECEIVED, seed=0)
    entries = torch.cat([u.flatten() for u in CHANGE.values()])
    mean_abs = float(entries.abs().mean())  # (1+2+0+1 + 0.5+0.5 + 2+4) / 8 = 1.375
    assert mean_abs == pytest.approx(1.375)
    for u in _sent_change(out).values():
        torch.testing.assert_close(u, torch.full_like(u, mean_abs))
    fixed = attack_update(Attack("same-value", -2.0), UPLOAD, RECEIVED, seed=0)
    for u in _sent_change(fixed).values():
        torch.testing.assert_close(u, torch.full_like(u, -2.0))


def test_update_attack_keeps_the_dtype_and_refuses_data_attacks():
    up = {"a": UPLOAD["a"].to(torch.bfloat16)}
    out = attack_update(Attack("scale", 2.0), up, RECEIVED, seed=0)
    assert out["a"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="data attack"):
        attack_update(Attack("label-flip"), UPLOAD, RECEIVED, seed=0)


# -- who attacks ---------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "n", "count"), [(0.2, 10, 2), (0.4, 10, 4), (0.34, 3, 1), (0.7, 10, 7),
                                                  (0.05, 10, 1), (0.04, 10, 0), (1.0, 5, 5), (0.0, 5, 0)])
def test_attacker_ids_have_the_right_count_and_are_seeded(rate, n, count):
    cfg = FaultConfig(byzantine_rate=rate, attack="sign-flip")
    ids = attacker_ids(cfg, 7, n)
    assert len(ids) == count and ids == sorted(set(ids)) and all(0 <= i < n for i in ids)
    assert attacker_ids(cfg, 7, n) == ids
    for pid in range(n):
        assert (client_attack(cfg, 7, pid, n) is not None) == (pid in ids)


def test_attacker_ids_depend_on_the_seed_and_a_lower_rate_is_a_prefix():
    cfg = FaultConfig(byzantine_rate=0.3, attack="sign-flip")
    sets = {tuple(attacker_ids(cfg, seed, 10)) for seed in range(10)}
    assert len(sets) > 1
    low = set(attacker_ids(FaultConfig(byzantine_rate=0.2, attack="sign-flip"), 3, 10))
    assert low < set(attacker_ids(FaultConfig(byzantine_rate=0.4, attack="sign-flip"), 3, 10))
    assert attacker_ids(FaultConfig(byzantine_rate=0.5, attack="none"), 3, 10) == []


# -- data attacks --------------------------------------------------------------------

CLS, SEP, TRIGGER = 101, 102, [9]


def _examples(n=10):
    ids = [[CLS, 20 + i, 40 + i, SEP] for i in range(n)]
    labels = [i % 3 for i in range(n)]
    return Examples(input_ids=ids, labels=labels, groups=[0] * n, label_ids=list(labels))


def test_label_flip_shifts_every_label():
    ex = _examples()
    flipped = flip_labels(ex, 3)
    assert flipped.labels == [(y + 1) % 3 for y in ex.labels]
    assert all(a != b for a, b in zip(flipped.labels, ex.labels, strict=True))
    assert flipped.input_ids == ex.input_ids and flipped.label_ids == ex.label_ids


def test_trigger_goes_after_cls_and_truncation_keeps_sep():
    special = frozenset({CLS, SEP})
    assert insert_trigger([CLS, 5, 6, SEP], [9, 8], 16, special) == [CLS, 9, 8, 5, 6, SEP]
    assert insert_trigger([CLS, 5, 6, SEP], [9], 4, special) == [CLS, 9, 5, SEP]
    assert insert_trigger([5, 6], [9], 16) == [9, 5, 6]


def test_backdoor_poisons_exactly_the_seeded_share():
    ex = _examples(10)
    special = frozenset({CLS, SEP})
    poisoned = poison_backdoor(ex, TRIGGER, 0, 0.3, seed=5, max_length=16, special=special)
    hit = [i for i, ids in enumerate(poisoned.input_ids) if TRIGGER[0] in ids]
    assert len(hit) == 3
    for i in range(10):
        if i in hit:
            assert poisoned.input_ids[i] == [CLS, 9, *ex.input_ids[i][1:]] and poisoned.labels[i] == 0
        else:
            assert poisoned.input_ids[i] == ex.input_ids[i] and poisoned.labels[i] == ex.labels[i]
    assert poison_backdoor(ex, TRIGGER, 0, 0.3, 5, 16, special) == poisoned
    assert poison_backdoor(ex, TRIGGER, 0, 0.3, 6, 16, special) != poisoned


def test_triggered_inputs_keep_non_target_examples_labelled_as_target():
    ex = _examples(9)
    trig = triggered_inputs(ex, TRIGGER, 0, 16, frozenset({CLS, SEP}))
    assert len(trig) == 6 and trig.labels == [0] * 6
    assert all(ids[1] == 9 for ids in trig.input_ids)


def test_data_attacks_need_a_classification_task():
    @dataclass
    class NotClassification:
        name: str = "synthetic"
        classification: bool = False

    with pytest.raises(ConfigError, match="label-flip needs a classification task"):
        poison_data(NotClassification(), _examples(), Attack("label-flip"), 0)


# -- effect on tiny runs ---------------------------------------------------------------


def _adapter(directory: str) -> dict[str, torch.Tensor]:
    return load_file(str(pathlib.Path(directory) / "adapter" / "adapter_model.safetensors"))


def test_sign_flip_moves_the_global_adapter_by_the_flipped_update(tiny_config):
    """FedIT's mean is linear in each client's tensors, so with attacker weight p and
    honest change u: G_flip = G_clean − 2p·u and G_zero (scale:0) = G_clean − p·u, hence
    G_flip = 2·G_zero − G_clean exactly."""
    from fedpeft.flower.inprocess import run_in_process

    base = {**tiny_config, "federation.rounds": 1, "faults.byzantine-rate": 0.34}
    runs = {}
    for name, attack in (("clean", "none"), ("flip", "sign-flip"), ("zero", "scale:0")):
        out = f"{tiny_config['output.dir']}-{name}"
        runs[name] = (run_in_process({**base, "faults.attack": attack, "output.dir": out}), _adapter(out))
    assert all("backdoor_asr" not in r for r in runs["clean"][0].rounds)
    clean, flip, zero = (runs[k][1] for k in ("clean", "flip", "zero"))
    moved = 0.0
    for key in clean:
        torch.testing.assert_close(flip[key], 2 * zero[key] - clean[key], atol=1e-5, rtol=1e-4)
        moved = max(moved, float((flip[key] - clean[key]).abs().max()))
    assert moved > 1e-4
    assert runs["flip"][0].rounds[1]["rejected"] == 0


def test_label_flip_changes_only_the_attackers_training(tiny_config):
    from fedpeft.flower.inprocess import run_in_process

    base = {**tiny_config, "federation.rounds": 1, "faults.byzantine-rate": 0.34}
    clean = run_in_process({**base, "output.dir": tiny_config["output.dir"] + "-c"})
    flipped = run_in_process({**base, "faults.attack": "label-flip", "output.dir": tiny_config["output.dir"] + "-f"})
    attackers = attacker_ids(parse_run_config(base | {"faults.attack": "label-flip"}).faults, 0, 3)
    assert len(attackers) == 1
    loss = {
        name: {c["partition_id"]: c["train-loss"] for c in run.rounds[1]["clients"]}
        for name, run in (("clean", clean), ("flipped", flipped))
    }
    for pid in range(3):
        if pid in attackers:
            assert loss["flipped"][pid] != loss["clean"][pid]
        else:
            assert loss["flipped"][pid] == loss["clean"][pid]


def test_predict_gives_the_classes_evaluate_counts(tiny_config):
    from fedpeft.tasks import get_task

    task = get_task(parse_run_config(tiny_config))
    model, test = task.model(8), task.test_data()
    predicted = task.predict(model, test)
    assert predicted.shape == (len(test),)
    assert (predicted == torch.tensor(test.labels).numpy()).mean() == task.evaluate(model, test)["accuracy"]


def test_backdoor_flip_counts_only_inputs_the_model_gets_right_without_the_trigger(monkeypatch, tiny_config):
    """Closed form with the model's predictions fixed: of the four non-target inputs
    (labels 1, 2, 1, 2), the clean model gets the first three right; the trigger turns
    the 1st, 2nd and 4th to the target 0. ASR = 3/4; flip = 2 of the 3 right = 2/3."""
    import numpy as np

    from fedpeft.attacks import TARGET_CLASS
    from fedpeft.tasks import get_task

    assert TARGET_CLASS == 0
    task = get_task(parse_run_config({**tiny_config, "faults.attack": "backdoor"}))
    labels = [1, 0, 2, 1, 0, 2]
    data = Examples(input_ids=[[101, 7 + i, 102] for i in range(6)], labels=labels, groups=[0] * 6, label_ids=labels)
    answers = {
        "clean": np.array([1, 2, 1, 0]),  # right, right, right, wrong
        "triggered": np.array([0, 0, 1, 0]),
    }

    def fake_predict(model, examples):
        kind = "triggered" if all(len(x) == 3 + 1 for x in examples.input_ids) else "clean"
        assert examples.labels == ([0] * 4 if kind == "triggered" else [1, 2, 1, 2])
        return answers[kind]

    monkeypatch.setattr(task, "predict", fake_predict)
    monkeypatch.setattr("fedpeft.tasks.classification.trigger_tokens", lambda tok: ([999], frozenset({101, 102})))
    scores = task.backdoor_success(None, data)
    assert scores == {"backdoor_asr": 0.75, "backdoor_flip": 2 / 3}
    answers["clean"] = np.array([0, 0, 0, 0])  # the clean model gets none right
    assert task.backdoor_success(None, data)["backdoor_flip"] == 0.0


def test_backdoor_reports_the_attack_success_rate_every_round(tiny_config):
    from fedpeft.flower.inprocess import run_in_process

    results = run_in_process({**tiny_config, "faults.byzantine-rate": 0.34, "faults.attack": "backdoor"})
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    for record in results.rounds:
        assert 0.0 <= record["backdoor_asr"] <= 1.0
        assert 0.0 <= record["backdoor_flip"] <= 1.0
