"""Client-side remedies for heterogeneous data: FedProx's proximal term
(``train.prox-mu``) and the logit-adjusted loss (``train.logit-adjust``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedpeft import ConfigError, FullAdapter
from fedpeft.client.prox import proximal_term
from fedpeft.client.round import _penalty
from fedpeft.config import parse_run_config
from fedpeft.server.setup import build_strategy
from fedpeft.tasks import get_task
from fedpeft.tasks.logit_adjust import FLOOR, adjusted_cross_entropy, log_prior
from tests.conftest import TINY
from tests.strategies import _factories as fx


def test_the_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_pulls_back():
    anchor = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    params = {"a": torch.full((2, 3), 2.0, requires_grad=True), "b": torch.ones(4, requires_grad=True)}
    term = proximal_term(params, anchor, mu=0.5)
    assert float(term.detach()) == pytest.approx(0.25 * 6 * 4.0)
    term.backward()
    torch.testing.assert_close(params["a"].grad, torch.full((2, 3), 1.0))  # μ (w − w₀)
    assert proximal_term({"x": torch.ones(1)}, anchor, 1.0) is None


def _distance(cfg_overrides, data_filter=None):
    cfg = parse_run_config({**TINY, "train.local-steps": 8, **cfg_overrides})
    task = get_task(cfg)
    model = task.model(4)
    start = {k: v.clone() for k, v in model.initial.items()}
    model.load(start)
    data, _ = task.client_data(0, 3)
    if data_filter is not None:
        data = data.subset([i for i, y in enumerate(data.labels) if data_filter(y)])
    trainable = frozenset(start)
    result = task.train(model, data, trainable, 0, _penalty(cfg, FullAdapter(), fx.plan(0), start))
    trained = model.tensors()
    return math.sqrt(sum(float(((trained[k] - start[k]) ** 2).sum()) for k in start)), result


def test_fedprox_keeps_the_local_model_near_where_it_started():
    plain, _ = _distance({})
    prox, _ = _distance({"train.prox-mu": 100.0})
    assert prox < 0.5 * plain, (prox, plain)


def test_the_logit_adjusted_loss_is_cross_entropy_on_shifted_logits():
    prior = log_prior([0, 0, 0, 1], 3)
    torch.testing.assert_close(prior, torch.tensor([0.75, 0.25, FLOOR]).log())
    z, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 0, 1])
    want = F.cross_entropy(z + 0.5 * prior, y)
    torch.testing.assert_close(adjusted_cross_entropy(z, y, prior, 0.5), want)


def test_a_one_class_client_learns_nothing_from_the_balanced_loss():
    sgd = {"train.optimizer": "sgd", "train.lr": 0.5}
    plain, _ = _distance(sgd, lambda y: y == 2)
    balanced, result = _distance({**sgd, "train.logit-adjust": 1.0}, lambda y: y == 2)
    assert plain > 1e-3 and balanced < 1e-3 * plain, (balanced, plain)
    assert result.loss < 1e-4  # CE(z + log π, y) ≈ 0 when π is one-hot on y


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "fedspine", "train.prox-mu": 0.1}, "trains in its own local_round"),
        ({"task.name": "causal-lm", "train.logit-adjust": 1.0}, "needs a classification task"),
    ],
)
def test_remedies_that_cannot_apply_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(parse_run_config(overrides))
