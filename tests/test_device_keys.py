"""Devices, precision, dtype, quantization and local model folders (issue 19): what
runs on a CPU is run here; what needs CUDA is checked to be refused clearly."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fedpeft.config import parse_run_config
from fedpeft.errors import ConfigError
from fedpeft.flower.inprocess import run_in_process
from fedpeft.preflight import check_config
from fedpeft.tasks import get_task
from fedpeft.tasks.device import autocast, check_quantization, grad_scaler, resolve_device
from fedpeft.tasks.packages import minilm_dir
from tests.support.scripts import ROOT

TINY = {
    "model.name": "tiny-bert",
    "data.max-examples": 48,
    "data.test-size": 120,
    "train.local-steps": 4,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "federation.rounds": 2,
    "federation.clients": 2,
    "output.save-adapter": False,
}


def test_auto_is_the_cpu_here_and_cuda_is_refused_with_what_the_machine_has(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"train.device='{asked}' but torch .* sees no CUDA device"):
            check_config({**TINY, "train.device": asked})
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        parse_run_config({"train.device": "gpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1").index == 1
    with pytest.raises(ConfigError, match=r"train.device='cuda:2' but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_quantization_needs_cuda_and_bitsandbytes(monkeypatch):
    with pytest.raises(ConfigError, match="model.quantization='4bit' needs a CUDA device"):
        check_config({**TINY, "model.quantization": "4bit"})
    check_quantization("none", torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # bitsandbytes absent
    with pytest.raises(ConfigError, match=r'needs bitsandbytes: pip install "fedpeft\[gpu\]"'):
        check_quantization("8bit", torch.device("cuda"))
    with pytest.raises(ConfigError, match="model.quantization"):
        parse_run_config({"model.quantization": "2bit"})


def test_gpus_per_client_goes_to_ray_and_is_refused_without_a_gpu(monkeypatch):
    from fedpeft.flower.simulation import backend_config, check_resources

    cfg = parse_run_config({"simulation.gpus-per-client": 0.25})
    with pytest.raises(ConfigError, match="simulation.gpus-per-client=0.25 but torch .* sees no CUDA device"):
        check_resources(cfg, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_resources(cfg, 2)
    backend = backend_config(cfg, 2)
    assert backend["client_resources"]["num_gpus"] == 0.25 and backend["init_args"]["num_gpus"] == 1
    plain = backend_config(parse_run_config({}), 2)
    assert plain["client_resources"]["num_gpus"] == 0.0 and "num_gpus" not in plain["init_args"]
    with pytest.raises(ConfigError, match="simulation.gpus-per-client must be >= 0"):
        parse_run_config({"simulation.gpus-per-client": -1})


def test_a_supernode_node_config_sets_its_own_device():
    from fedpeft.flower.client_app import _config

    context = SimpleNamespace(run_config={"train.device": "auto", "seed": 3}, node_config={"train.device": "cpu"})
    assert _config(context, {}).train.device == "cpu"
    context.node_config = {"partition-id": 0}
    assert _config(context, {}).train.device == "auto"


def test_bf16_autocast_trains_on_the_cpu_with_a_bf16_base_and_fp32_adapter_tensors(tmp_path):
    flat = {**TINY, "model.dtype": "bf16", "train.precision": "bf16", "output.dir": str(tmp_path / "run")}
    results = run_in_process(flat)
    assert results.rounds[-1]["loss"] < results.rounds[0]["loss"]
    cfg = parse_run_config(flat)
    model = get_task(cfg).model(8)
    base = model.model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert base.dtype == torch.bfloat16
    assert {t.dtype for t in model.tensors().values()} == {torch.float32}
    assert all(t.device.type == "cpu" for t in model.tensors().values())


def test_fp16_training_uses_a_gradient_scaler_and_stays_finite():
    cfg = parse_run_config({**TINY, "train.precision": "fp16"})
    assert isinstance(grad_scaler(torch.device("cpu"), "fp16"), torch.amp.GradScaler)
    assert grad_scaler(torch.device("cpu"), "bf16") is None
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    task = get_task(cfg)
    model = task.model(8)
    train, _ = task.client_data(0, 2)
    before = model.tensors()
    result = task.train(model, train, frozenset(model.params), seed=1)
    after = model.tensors()
    assert torch.isfinite(torch.tensor(result.loss)) and result.tokens > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_update():
    updates = []
    for checkpointing in (False, True):
        cfg = parse_run_config({**TINY, "train.gradient-checkpointing": checkpointing})
        task = get_task(cfg)
        model = task.model(8)
        model.load(model.initial)
        train, _ = task.client_data(0, 2)
        task.train(model, train, frozenset(model.params), seed=1)
        updates.append(model.tensors())
        assert model.model.base_model.model.is_gradient_checkpointing == checkpointing
    for key in updates[0]:
        torch.testing.assert_close(updates[0][key], updates[1][key], rtol=1e-5, atol=1e-6)


def _folder(tmp_path, kind: str):
    """A tiny random model of ``kind`` saved as a Hugging Face folder with MiniLM's tokenizer."""
    import transformers as tf

    small = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 256}
    configs = {
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, {"num_labels": 3}),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 2}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"num_key_value_heads": 2}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"num_key_value_heads": 2}),
    }
    config_cls, model_cls, extra = configs[kind]
    torch.manual_seed(0)
    folder = tmp_path / kind
    model_cls(config_cls(**small, **extra)).save_pretrained(folder)
    for f in minilm_dir().iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return str(folder)


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2", "mistral"])
def test_a_local_model_folder_trains_with_all_linear(tmp_path, kind):
    task = {"task.name": "classification"} if kind == "bert" else {
        "task.name": "causal-lm", "data.test-size": 40, "model.max-length": 48}
    flat = {**TINY, **task, "model.name": _folder(tmp_path, kind), "lora.target-modules": "all-linear",
            "output.dir": str(tmp_path / "run")}
    check_config(flat)
    results = run_in_process(flat)
    assert results.rounds[-1]["loss"] < results.rounds[0]["loss"]
    model = get_task(parse_run_config(flat)).model(8)
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in model.params if ".lora_A" in k}
    expected = {"query", "key", "value", "dense"} if kind == "bert" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert expected <= wrapped


def test_gpu_check_runs_its_cpu_part_and_says_the_gpu_was_not_used(tmp_path):
    script = ROOT / "simulations" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    args = ["--model", "tiny-llama", "--rounds", "1", "--steps", "2"]
    cpu = subprocess.run([str(script), "--cpu-only", *args], capture_output=True, text=True, env=env, timeout=600)
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    assert "| cpu-fp32 | cpu |" in cpu.stdout and "ok: every setting ran" in cpu.stdout
    full = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    if torch.cuda.is_available():
        assert full.returncode == 0, full.stderr[-2000:]
    else:
        assert full.returncode == 3 and "the GPU was not used" in full.stderr


def test_num_threads_sets_torch_threads_for_the_client_round(tmp_path):
    before = torch.get_num_threads()
    try:
        run_in_process({**TINY, "federation.rounds": 1, "train.num-threads": 1, "output.dir": str(tmp_path / "a")})
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        run_in_process({**TINY, "federation.rounds": 1, "output.dir": str(tmp_path / "b")})
        assert torch.get_num_threads() == 2  # 0: left alone
    finally:
        torch.set_num_threads(before)
