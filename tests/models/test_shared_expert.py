"""A shared expert beside the routed experts (issue 25, design 1): `reconstruct --shared-ratio s`.

s = 0 is today's DIVE bit for bit; with a shared expert each token's output is the shared expert's plus
its routed experts'; a shared/routed partition of all channels, every token to both routed experts at
weight 1, is the dense model; reconstruction, the router fit, evaluation, LoRA, expert parallelism and
the exports handle it."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dive_ds.build.expert_plan import ReconstructConfig, plan_experts
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.eval.perplexity import domain_perplexities
from dive_ds.eval.streamed import streamed_report
from dive_ds.io.calibration import load_calibration
from dive_ds.io.export import export_model
from dive_ds.io.loading import load_causal_lm, load_dense_model
from dive_ds.models.lora import add_expert_lora, experts_stage_trainable, merge_expert_lora
from dive_ds.models.moe import DiveMoeForCausalLM, count_parameters, moe_blocks
from dive_ds.stats import mean_var
from tests.fixtures.tiny import make_tiny_calibration, random_moe, tiny_moe_config


def _mlp(x, gate_up, down):
    """A gated MLP by hand: (silu(x Wg) * x Wu) Wd, with gate_up = [Wg; Wu] stacked on the rows."""
    w = gate_up.shape[0] // 2
    return (F.silu(x @ gate_up[:w].T) * (x @ gate_up[w:].T)) @ down.T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    model, calib = make_tiny_calibration(root, n_domains=4, windows=6, seq_len=16, n_eval=3)
    groups = root / "groups.json"
    groups.write_text(json.dumps({"a": ["dom0", "dom1"], "b": ["dom2", "dom3"]}))
    return {"root": root, "dense": model, "calib": calib, "groups": groups, "cal": load_calibration(calib)}


def test_zero_shared_ratio_is_todays_dive_bit_for_bit(tiny):
    cal, groups = tiny["cal"], json.loads(tiny["groups"].read_text())
    base = ReconstructConfig(num_experts=2, top_k=1)
    a = plan_experts(cal.stats, cal.domains, groups, base)
    b = plan_experts(
        cal.stats, cal.domains, groups, ReconstructConfig(num_experts=2, top_k=1, shared_ratio=0.0)
    )
    assert b.shared_L is None and all(torch.equal(x, y) for x, y in zip(a.kept_L, b.kept_L))
    out_a = run_reconstruct(tiny["calib"], tiny["groups"], tiny["root"] / "s0a", base)
    out_b = run_reconstruct(tiny["calib"], tiny["groups"], tiny["root"] / "s0b",
                            ReconstructConfig(num_experts=2, top_k=1, shared_ratio=0.0))  # fmt: skip
    for f in sorted(out_a.glob("*.safetensors")):
        assert f.read_bytes() == (out_b / f.name).read_bytes(), f.name
        assert not any("shared_expert" in k for k in load_file(f))
    assert json.loads((out_a / "config.json").read_text()).get("shared_expert_intermediate_size", 0) == 0


def test_each_token_gets_the_shared_expert_plus_its_routed_experts():
    config = tiny_moe_config(shared_expert_intermediate_size=8, num_experts_per_tok=2)
    model = random_moe(config, seed=3)
    block = moe_blocks(model)[0]
    x = torch.randn(7, config.hidden_size)
    with torch.no_grad():
        got = block(x.unsqueeze(0))[0]
        routed = block.gate(x)
        ex, sh = block.experts, block.shared_expert
        want = _mlp(x, sh.gate_up_proj[0], sh.down_proj[0])
        for t in range(x.shape[0]):
            for k in range(2):
                e = int(routed.top_idx_TK[t, k])
                y = _mlp(x[t : t + 1], ex.gate_up_proj[e], ex.down_proj[e])[0] + ex.bias[e]
                want[t] += routed.weights_TK[t, k] * y
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    n = count_parameters(config)
    assert n["total"] == sum(p.numel() for p in model.parameters())
    # the shared expert's parameters count in the activated ones too
    assert (
        n["activated"] - count_parameters(tiny_moe_config(num_experts_per_tok=2))["activated"]
        == config.num_hidden_layers * 3 * 8 * config.hidden_size
    )


def test_shared_and_two_routed_experts_partitioning_the_channels_give_the_dense_logits(tiny):
    """Shared expert = a third of the channels, the two routed experts the other two thirds; every token to both
    routed experts at weight 1, no bias: the dense model's logits."""
    dense = load_dense_model(tiny["dense"]).eval()
    cfg = dense.config
    f = cfg.intermediate_size  # 48
    config = tiny_moe_config(**{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")},
                             num_local_experts=2, num_experts_per_tok=2, expert_intermediate_size=f // 3,
                             shared_expert_intermediate_size=f // 3, expert_bias=False)  # fmt: skip
    moe = DiveMoeForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    perm = torch.randperm(f, generator=torch.Generator().manual_seed(0)).view(3, f // 3)
    for li, layer in enumerate(dense.model.layers):
        g, u, d = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        p = f"model.layers.{li}.mlp."
        state[p + "shared_expert.gate_up_proj"] = torch.cat([g[perm[0]], u[perm[0]]]).unsqueeze(0)
        state[p + "shared_expert.down_proj"] = d[:, perm[0]].unsqueeze(0)
        state[p + "experts.gate_up_proj"] = torch.stack([torch.cat([g[c], u[c]]) for c in perm[1:]])
        state[p + "experts.down_proj"] = torch.stack([d[:, c] for c in perm[1:]])
        state[p + "gate.weight"] = torch.zeros(2, cfg.hidden_size)
        state[p + "gate.noise_weight"] = torch.zeros(2, cfg.hidden_size)
    moe.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    for block in moe_blocks(moe):  # both routed experts, weight 1 each
        block.route = lambda x: (
            torch.tensor([[0, 1]]).expand(x.shape[0], 2),
            torch.ones(x.shape[0], 2),
            None,
        )
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_reconstruct_fit_evaluate_lora_ep_and_exports_with_a_shared_expert(tiny, tmp_path, capsys):
    from dive_ds.build.fit_router import run_fit_router
    from dive_ds.build.router_config import RouterFitConfig
    from dive_ds.parallel.expert_parallel import ep_block_from

    cal = tiny["cal"]
    cfg = ReconstructConfig(num_experts=2, top_k=1, prune_ratio=0.5, shared_ratio=0.25)
    moe_dir = run_reconstruct(tiny["calib"], tiny["groups"], tmp_path / "moe", cfg)
    config = json.loads((moe_dir / "config.json").read_text())
    assert (config["shared_expert_intermediate_size"], config["expert_intermediate_size"]) == (
        12,
        12,
    )  # 48 x .25
    from dive_ds.build.compare_score import widths_of

    assert widths_of(moe_dir) == {"routed": 12, "shared": 12}  # what compare records: a token runs both
    plan = plan_experts(cal.stats, cal.domains, json.loads(tiny["groups"].read_text()), cfg)
    dense = load_file(tiny["dense"] / "model.safetensors")
    mean, _ = mean_var(cal.stats.merged([0, 1]).count_D, cal.stats.merged([0, 1]).sum_DLF,
                       cal.stats.merged([0, 1]).sumsq_DLF)  # fmt: skip
    for layer in range(3):
        shared, kept = plan.shared_L[layer], plan.kept_L[layer]
        for e in range(2):
            assert not set(shared.tolist()) & set(kept[e].tolist())  # disjoint from every routed expert
        # expert 0 (group a = dom0, dom1) compensates exactly what neither it nor the shared expert keeps
        w_down = dense[f"model.layers.{layer}.mlp.down_proj.weight"]
        removed = torch.ones(48, dtype=torch.bool)
        removed[shared] = removed[kept[0]] = False
        bias = w_down[:, removed].double() @ mean[0, layer, removed].double()
        got = load_file(moe_dir / f"model-layer-{layer:05d}.safetensors")[
            f"model.layers.{layer}.mlp.experts.bias"
        ]
        torch.testing.assert_close(got[0], bias.float(), atol=1e-6, rtol=1e-6)
    # the router fit labels tokens by the routed part's error, with the sliced shortcut on every layer
    fitted = tmp_path / "fitted"
    rep = run_fit_router(moe_dir, tiny["calib"], fitted, RouterFitConfig(progress=False), device="cpu")
    assert rep["sliced_layers"] == 3 and 0.0 <= rep["mean_label_accuracy_heldout"] <= 1.0
    # evaluation: streamed == whole model
    m = load_causal_lm(fitted).eval()
    whole = domain_perplexities(m, cal.eval, batch_size=2)
    streamed = streamed_report(fitted, cal.eval, batch_size=2)["router"]
    assert max(abs(whole[k] / streamed[k] - 1) for k in whole) < 1e-6
    # LoRA adapts the shared expert too; merged, the model is plain again
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        plain = m(input_ids=x).logits
    n_lora = sum(p.numel() for p in add_expert_lora(m, r=2, seed=0))
    m.eval()  # the new adapters' dropout off
    assert n_lora == experts_stage_trainable(m.config, lora_r=2)["by_kind"]["lora"]
    with torch.no_grad():
        for block in moe_blocks(m):
            block.shared_expert.lora_down_B.normal_()
        adapted = m(input_ids=x).logits
        merged = merge_expert_lora(m)(input_ids=x).logits
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    assert (adapted - plain).abs().max() > 1e-2  # the shared expert's adapter did change the model
    assert not any("lora" in k for k in m.state_dict())
    # an expert-parallel block (one rank) carries the shared expert as it is
    block = moe_blocks(m)[0]
    ep = ep_block_from(block, m.config, ep_size=1, ep_rank=0)
    h = torch.randn(1, 5, m.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ep(h), block(h))
    # exports: the portable format keeps it, Mixtral refuses it in one line
    export_model(fitted, tmp_path / "portable", "portable")
    assert (
        json.loads((tmp_path / "portable" / "config.json").read_text())["shared_expert_intermediate_size"]
        == 12
    )
    with pytest.raises(ValueError, match="Mixtral has no shared expert"):
        export_model(fitted, tmp_path / "mixtral", "mixtral")


def test_bad_shared_ratios_are_refused():
    with pytest.raises(ValueError, match=r"must be in \[0, 1 - r = 0.5\)"):
        ReconstructConfig(num_experts=2, prune_ratio=0.5, shared_ratio=0.5)
    with pytest.raises(ValueError, match="--shared-ratio works with --top-k 1"):
        ReconstructConfig(num_experts=4, top_k=2, prune_ratio=0.75, shared_ratio=0.125)
    with pytest.raises(ValueError, match="--shared-ratio is for methods dive and nomining, not llama-moe"):
        ReconstructConfig(num_experts=2, prune_ratio=0.5, shared_ratio=0.25, method="llama-moe")


def test_a_sharded_exports_shared_state_has_the_shared_lora_merged():
    """Expert-parallel retraining exports the shared expert (replicated) from the gathered shared state: its
    LoRA is folded in there as merge_expert_lora folds it; the trainer trains it as LoRA."""
    from dive_ds.train.export import merge_shared_lora
    from dive_ds.train.trainable import param_kind

    model = random_moe(tiny_moe_config(shared_expert_intermediate_size=8), seed=1)
    add_expert_lora(model, r=2, alpha=4, seed=0)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.shared_expert.lora_gate_up_B.normal_()
            block.shared_expert.lora_down_B.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    assert param_kind("model.layers.0.mlp.shared_expert.lora_down_A") == "lora"
    assert param_kind("model.layers.0.mlp.shared_expert.gate_up_proj") == "other"  # frozen, like attention
    merge_shared_lora(state, {"r": 2, "alpha": 4})
    merge_expert_lora(model)
    want = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    assert sorted(state) == sorted(want)
    for k in want:
        torch.testing.assert_close(state[k], want[k], atol=1e-6, rtol=1e-6)
    assert merge_shared_lora(dict(want), None).keys() == want.keys()
