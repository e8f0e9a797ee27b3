"""A strategy registered from outside the package runs end to end (the README example)."""

from __future__ import annotations

import pathlib
import sys

from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.server_app import run_server
from tests.support.fake_grid import InProcessGrid

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "simulations" / "plugins" / "median_lora.py"


def test_readme_shows_the_plugin_verbatim():
    readme = (ROOT / "README.md").read_text()
    body = PLUGIN.read_text().split('"""', 2)[2].strip()  # the code after the docstring
    assert body in readme


def test_plugin_strategy_runs(tiny_config, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN.parent))
    sys.modules.pop("median_lora", None)
    cfg = {**tiny_config, "strategy.name": "median-lora", "strategy.plugins": "median_lora",
           "median-lora.min-clients": 2}
    grid = InProcessGrid(make_client_app(), 3, run_config=cfg)
    results = run_server(grid, cfg)
    assert results.strategy == "median-lora"
    assert len(results.rounds) == 3
    assert results.rounds[2]["loss"] != results.rounds[0]["loss"]  # the median moved the model
