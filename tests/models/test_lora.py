"""Expert LoRA: starts as the identity, trains through the grouped dispatch, merges exactly."""

import pytest
import torch

from dive_ds.models.lora import (
    LORA_PARAM_NAMES,
    LoraDiveExperts,
    add_expert_lora,
    experts_stage_trainable,
    has_expert_lora,
    lora_expert_mlp,
    lora_rank_for_trainable,
    merge_expert_lora,
)
from dive_ds.models.moe import (
    DiveExperts,
    count_parameters,
    grouped_expert_mlp,
    moe_blocks,
)
from tests.fixtures.tiny import IMPLS, small_moe, small_moe_config

PER_LAYER = dict(expert_intermediate_size=None, expert_intermediate_sizes=[12, 20])
"""Per-layer expert widths (as flap-adaptive writes them)."""


def randomise_lora_b(model, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in moe_blocks(model):
            for name in ("lora_gate_up_B", "lora_down_B"):
                p = getattr(block.experts, name)
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_shapes_names_and_identity_at_init():
    model = small_moe().eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    names_before = set(dict(model.named_parameters()))
    params = add_expert_lora(model, r=4, alpha=8, dropout=0.1, seed=3)
    assert len(params) == 4 * 2 and has_expert_lora(model)
    exp = moe_blocks(model)[0].experts
    assert isinstance(exp, LoraDiveExperts) and exp.scale == 2.0
    assert exp.lora_gate_up_A.shape == (4, 4, 32) and exp.lora_gate_up_B.shape == (4, 32, 4)
    assert exp.lora_down_A.shape == (4, 4, 16) and exp.lora_down_B.shape == (4, 32, 4)
    names_after = set(dict(model.named_parameters()))
    assert names_before <= names_after  # base names unchanged (same Parameter objects)
    assert {n.rsplit(".", 1)[1] for n in names_after - names_before} == set(LORA_PARAM_NAMES)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # B = 0
    other = small_moe()
    add_expert_lora(other, r=4, alpha=8, seed=3)  # the same seed gives the same A on every rank
    torch.testing.assert_close(
        moe_blocks(other)[1].experts.lora_down_A, moe_blocks(model)[1].experts.lora_down_A
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_mlp_equals_effective_weights(impl):
    g = torch.Generator().manual_seed(0)
    E, H, Fw, R, N = 3, 16, 8, 4, 10
    x = torch.randn(N, H, generator=g)
    counts = torch.tensor([4, 0, 6])
    w_gu, w_d = torch.randn(E, 2 * Fw, H, generator=g), torch.randn(E, H, Fw, generator=g)
    lora = (
        torch.randn(E, R, H, generator=g),
        torch.randn(E, 2 * Fw, R, generator=g),
        torch.randn(E, R, Fw, generator=g),
        torch.randn(E, H, R, generator=g),
    )
    bias = torch.randn(E, H, generator=g)
    y = lora_expert_mlp(
        x, counts, w_gu, w_d, lora, 0.5, torch.nn.functional.silu, torch.nn.Identity(), bias, impl
    )
    eff_gu = w_gu + 0.5 * torch.bmm(lora[1], lora[0])
    eff_d = w_d + 0.5 * torch.bmm(lora[3], lora[2])
    ref = grouped_expert_mlp(x, counts, eff_gu, eff_d, torch.nn.functional.silu, bias, impl="loop")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [{}, PER_LAYER], ids=["one-width", "per-layer"])
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_is_exact_and_gives_plain_model(impl, widths, tmp_path):
    model = small_moe(top_k=2, **widths)
    add_expert_lora(model, r=4, alpha=16, dropout=0.1, seed=1)
    randomise_lora_b(model)
    for block in moe_blocks(model):
        block.experts.impl = impl
    model.eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    unmerged = model(input_ids=ids).logits
    base_before = moe_blocks(model)[0].experts.gate_up_proj.detach().clone()
    merge_expert_lora(model)
    assert not has_expert_lora(model)
    assert all(type(b.experts) is DiveExperts for b in moe_blocks(model))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not torch.equal(moe_blocks(model)[0].experts.gate_up_proj, base_before)
    merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)  # a plain checkpoint again
    from transformers import AutoModelForCausalLM

    import dive_ds  # noqa: F401  (registers dive_moe)

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=ids).logits, merged, rtol=0, atol=1e-5)


def test_dropout_is_real_in_training_and_off_in_eval():
    model = small_moe()
    add_expert_lora(model, r=4, alpha=16, dropout=0.5, seed=1)
    randomise_lora_b(model, std=0.5)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    for block in moe_blocks(model):
        block.gate.noise = False  # isolate dropout from router noise
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_only_lora_gets_gradients_when_base_frozen():
    model = small_moe()
    for p in model.parameters():
        p.requires_grad_(False)
    params = add_expert_lora(model, r=4, alpha=16, dropout=0.0, seed=1)
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    # B = 0 at init: A gets no gradient yet, B does.
    assert all(g.abs().sum() == 0 for n, g in grads.items() if n.endswith("_A"))
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("_B"))
    assert len(params) == len(grads)


def test_bad_arguments():
    model = small_moe()
    with pytest.raises(ValueError, match="rank r=0"):
        add_expert_lora(model, r=0)
    with pytest.raises(ValueError, match="dropout"):
        add_expert_lora(model, dropout=1.0)
    add_expert_lora(model)
    with pytest.raises(ValueError, match="already has expert LoRA"):
        add_expert_lora(model)


# --------------------------------------------------------------------------- trainable parameter counts


@pytest.mark.parametrize(
    "kw",
    [{}, PER_LAYER, {"dense_model_type": "qwen3", "head_dim": 8}, {"router_noise": False}],
    ids=["one-width", "per-layer", "qwen3-qk-norms", "no-noise"],
)
def test_experts_stage_trainable_equals_the_prepared_model(kw):
    from dive_ds.train.config import STAGE_DEFAULTS, StageConfig
    from dive_ds.train.trainable import prepare_stage_model

    model = small_moe(**kw)
    stage = StageConfig(name="experts", **STAGE_DEFAULTS["experts"])
    counts = prepare_stage_model(model, stage, seed=0)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = experts_stage_trainable(model.config, stage.lora_r)
    assert expected == {"trainable": counts["trainable"], "by_kind": counts["by_kind"]}
    assert counts["total"] == count_parameters(model.config)["total"] + expected["by_kind"]["lora"]


def test_lora_rank_for_trainable():
    config = small_moe_config(**PER_LAYER)
    at = {r: experts_stage_trainable(config, r)["trainable"] for r in (1, 5, 6)}
    assert lora_rank_for_trainable(config, at[5]) == 5
    assert lora_rank_for_trainable(config, at[5] + 1) == 6
    assert lora_rank_for_trainable(config, 0) == 1
    assert lora_rank_for_trainable(config, at[1] - 1) == 1
    no_norms = experts_stage_trainable(config, 3, train_norms=False)["trainable"]
    assert lora_rank_for_trainable(config, no_norms, train_norms=False) == 3
    with pytest.raises(ValueError, match="LoRA cannot match it"):
        lora_rank_for_trainable(
            config, experts_stage_trainable(config, 33)["trainable"]
        )  # > min(H=32, 2 x 20)
