"""Privacy options: Flower's central-DP wrapper composes with fedit; impossible
combinations are refused at config time."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from fedpeft import ConfigError
from fedpeft.config import parse_run_config
from fedpeft.flower.inprocess import run_in_process
from fedpeft.server.setup import build_strategy


def _adapter(path):
    return load_file(f"{path}/adapter/adapter_model.safetensors")


def _delta_norm(a, b):
    return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a) ** 0.5


def test_server_side_dp_clips_and_noises(tiny_config):
    base = {**tiny_config, "federation.rounds": 1, "train.lr": 5e-2}
    out = tiny_config["output.dir"]
    run_in_process({**base, "federation.rounds": 1, "train.local-steps": 1, "train.lr": 1e-12,
                    "output.dir": out + "-init"})
    init = _adapter(out + "-init")  # (almost) the initial adapter
    run_in_process({**base, "output.dir": out + "-plain"})
    run_in_process({**base, "output.dir": out + "-clip", "privacy.dp": "server-fixed",
                    "privacy.noise-multiplier": 0.0, "privacy.clip-norm": 0.01})
    run_in_process({**base, "output.dir": out + "-noise", "privacy.dp": "server-fixed",
                    "privacy.noise-multiplier": 1.0, "privacy.clip-norm": 0.01})
    plain, clip, noise = _adapter(out + "-plain"), _adapter(out + "-clip"), _adapter(out + "-noise")
    assert _delta_norm(plain, init) > 0.05
    assert _delta_norm(clip, init) <= 0.01 + 1e-4  # the mean of clipped updates
    assert _delta_norm(noise, clip) > 1e-3  # noise reached the global adapter


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"strategy.name": "lora-fair", "privacy.dp": "server-fixed"}, "does not compose with strategy 'lora-fair'"),
        ({"privacy.dp": "server-fixed", "codec.uplink": "int8"}, "needs a lossless codec.uplink"),
        ({"strategy.name": "flexlora", "privacy.secagg": True}, "needs each client's individual update"),
        ({"privacy.secagg": True}, r"SecAgg\+ only in its legacy API"),
    ],
)
def test_impossible_privacy_combinations_are_refused(flat, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_strategy(parse_run_config(flat))
