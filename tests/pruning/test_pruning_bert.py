"""In-place pruning of a tiny random BERT, plain and with peft LoRA (§11 test 1-2)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fedpeft.pruning.bert import (  # noqa: E402
    encoder_layers,
    lora_masks,
    prune_bert_,
    structure_counts,
    structure_scores,
)
from fedpeft.pruning.schedule import select_prune  # noqa: E402

KEEP_HEADS = {
    0: torch.tensor([True, False, True, False]),
    1: torch.tensor([False, True, True, True]),
}


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)  # transformers initialises weights from the global RNG
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).double().eval()


def keep_channels() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {i: torch.rand(128, generator=gen) > 0.4 for i in range(2)}


def zero_structures(model: torch.nn.Module, heads: dict, channels: dict) -> None:
    """Zero the contribution of removed heads/channels (columns of o / down)."""
    with torch.no_grad():
        for i, layer in enumerate(encoder_layers(model)):
            head_cols = (~heads[i]).repeat_interleave(16)
            for module, cols in (
                (layer.attention.output.dense, head_cols),
                (layer.output.dense, ~channels[i]),
            ):
                base = getattr(module, "base_layer", module)
                base.weight[:, cols] = 0.0
                if hasattr(module, "lora_A"):
                    module.lora_A["default"].weight[:, cols] = 0.0


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "key", "value", "dense"],
        init_lora_weights=False,
    )
    return peft.get_peft_model(model, config)


def test_pruned_bert_equals_zeroed_bert() -> None:
    pruned, reference = tiny_bert(), tiny_bert()
    channels = keep_channels()

    prune_bert_(pruned, KEEP_HEADS, channels)
    zero_structures(reference, KEEP_HEADS, channels)

    heads, widths = structure_counts(pruned)
    assert heads == {0: 2, 1: 3}
    assert widths == {i: int(channels[i].sum()) for i in range(2)}
    sa = encoder_layers(pruned)[1].attention.self
    assert sa.query.weight.shape == (48, 64) and sa.all_head_size == 48
    with torch.no_grad():
        out = pruned(**inputs()).last_hidden_state
        expected = reference(**inputs()).last_hidden_state
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_pruned_peft_bert_equals_zeroed_and_keeps_optimizer_in_sync() -> None:
    model = with_lora(tiny_bert())
    reference = with_lora(tiny_bert())
    reference.load_state_dict(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    untrained_heads, _ = structure_scores(model)
    assert all(
        torch.count_nonzero(s) == 0 for s in untrained_heads.values()
    )  # no grads yet
    model(**inputs()).last_hidden_state.pow(2).mean().backward()
    heads, chans = structure_scores(model)
    assert {i: s.shape for i, s in heads.items()} == {0: (4,), 1: (4,)}
    assert all(
        float(s.norm()) == pytest.approx(1.0)
        for s in (*heads.values(), *chans.values())
    )
    optimizer.step()
    reference.load_state_dict(model.state_dict())

    channels = select_prune(chans, 0.25, scope="layer")
    prune_bert_(model, KEEP_HEADS, channels, optimizer=optimizer)
    zero_structures(reference, KEEP_HEADS, channels)

    layer = encoder_layers(model)[0]
    assert layer.attention.self.query.lora_B["default"].weight.shape == (32, 4)
    assert layer.attention.output.dense.lora_A["default"].weight.shape == (4, 32)
    assert layer.output.dense.lora_A["default"].weight.shape == (4, 96)
    for p in params:
        for value in optimizer.state[p].values():
            if value.dim() > 0:
                assert value.shape == p.shape
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs()).last_hidden_state,
            reference(**inputs()).last_hidden_state,
            atol=1e-6,
            rtol=0,
        )
    optimizer.zero_grad()
    model(**inputs()).last_hidden_state.pow(2).mean().backward()
    optimizer.step()  # state and parameters agree after pruning


def test_lora_masks_per_module() -> None:
    paths = [
        "base_model.model.encoder.layer.0.attention.self.key",
        "base_model.model.encoder.layer.0.attention.output.dense",
        "base_model.model.encoder.layer.1.intermediate.dense",
        "base_model.model.encoder.layer.1.output.dense",
        "base_model.model.pooler.dense",
    ]
    channels = keep_channels()
    masks = lora_masks(paths, KEEP_HEADS, channels, head_dim=16)

    rows, cols = masks[paths[0]]
    assert (
        cols is None
        and rows is not None
        and rows.shape == (64,)
        and int(rows.sum()) == 32
    )
    assert masks[paths[1]][0] is None and torch.equal(masks[paths[1]][1], rows)
    assert torch.equal(masks[paths[2]][0], channels[1]) and masks[paths[2]][1] is None
    assert masks[paths[3]][0] is None and torch.equal(masks[paths[3]][1], channels[1])
    assert masks[paths[4]] == (None, None)


def test_bad_masks_raise() -> None:
    model = tiny_bert()
    with pytest.raises(
        ValueError, match="layer 0: head keep-mask has 3 entries, expected 4"
    ):
        prune_bert_(model, {0: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="keep at least one"):
        prune_bert_(model, None, {1: torch.zeros(128, dtype=torch.bool)})
