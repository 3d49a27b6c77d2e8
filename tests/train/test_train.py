"""DIVE retraining on one rank: configs, data stream, stages, checkpoints/resume, TensorBoard, export.

The training runs here are in-process (DeepSpeed on a 1-rank gloo group set up once per session),
except the crash/resume test, which kills a real launcher process and relaunches it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.data.registry import iter_documents
from dive_ds.data.split import split_texts
from dive_ds.train.config import RunConfig, StageConfig
from dive_ds.train.config_load import load_run_config, read_mapping, run_config_from_dict
from dive_ds.train.data import ByteTokenizer, PackedStream, build_stream, heldout_windows, resolve_domains
from dive_ds.train.ds_config import launch_ep_size, resolve_ds_config, resolve_ep_size
from tests.fixtures import REPO
from tests.fixtures.procs import subprocess_env
from tests.fixtures.train_setup import (
    ZERO2,
    ZERO3,
    base_run,
    load_state,
    make_tiny_setup,
    state_hashes,
    step_losses,
    write_ds,
    write_yaml,
)

# torch deprecates collective names DeepSpeed 0.19 still calls; pytest re-enables what the trainer silences
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_scatter_tensor.*:FutureWarning"),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def memorise_run(world, tiny, tmp_path_factory) -> dict:
    """Router (10 steps) then experts (10 steps, aux loss on) on a memorisable 4-sequence stream."""
    from dive_ds.train.retrain import train

    out = tmp_path_factory.mktemp("memorise") / "run"
    raw = base_run(
        tiny,
        out,
        data={"overfit_sequences": 4},
        stages={
            "router": {"steps": 10, "lr": 3.0e-2},
            "experts": {"steps": 10, "lr": 1.0e-2, "aux_loss_coef": 0.01},
        },
        checkpoint={"every": 5, "keep": 1},
        eval={"every": 5},
    )
    run = run_config_from_dict(raw)
    results = train(run, read_mapping(ZERO2), str(ZERO2))
    return {"out": out, "run": run, "results": results}


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_paper():
    run = run_config_from_dict({"model": {"path": "x"}})
    router, experts, cont = run.stages
    assert (router.name, router.router_mode, router.schedule, router.lr, router.lora) == (
        "router",
        "dense",
        "constant",
        1e-4,
        False,
    )
    assert (experts.router_mode, experts.schedule, experts.warmup_ratio, experts.min_lr_ratio) == (
        "sparse",
        "cosine",
        0.03,
        0.1,
    )
    assert (experts.lora, experts.lora_r, experts.lora_alpha, experts.lora_dropout) == (True, 8, 16.0, 0.1)
    assert experts.train_router and experts.train_norms and not experts.unfreeze_attention
    assert not cont.enabled and cont.lr == 1e-5 and cont.lora
    from dive_ds.train.config import stage_temperature

    assert stage_temperature(router, 1) == 0.05 and stage_temperature(router, 2) == 0.5
    assert run.data.seq_len == 1024 and run.data.registry == "demo"


def test_config_overrides_and_yaml(tmp_path):
    path = write_yaml(
        {"out_dir": "o", "model": {"path": "m"}, "stages": {"experts": {"lr": 2e-4}}}, tmp_path / "r.yaml"
    )
    run = load_run_config(
        path,
        [
            "stages.experts.lr=5e-5",
            "data.domains=[a, b]",
            "stages.continue.enabled=true",
            "stages.continue.steps=3",
            "train.global_batch_size=16",
        ],
    )
    assert run.stage("experts").lr == 5e-5 and run.data.domains == ("a", "b")
    assert [s.name for s in run.enabled_stages()] == ["router", "experts", "continue"]
    assert run.stage("continue").steps == 3 and run.train.global_batch_size == 16
    assert isinstance(run, RunConfig) and isinstance(run.stage("router"), StageConfig)
    again = run_config_from_dict(run.to_dict())  # the recorded config reloads to the same thing
    assert again == run


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"modle": {}},
            "unknown key 'modle'; allowed: checkpoint, data, eval, logging, model, out_dir, parallel, stages, train",
        ),
        ({"stages": {"experts": {"lrr": 1}}}, "unknown key 'stages.experts.lrr'; allowed: aux_loss_coef"),
        ({"stages": {"warmup": {}}}, "unknown key 'stages.warmup'; allowed: router, experts, continue"),
        ({"data": {"seq_len": "long"}}, "data.seq_len: expected an integer, got 'long'"),
        ({"stages": {"router": {"schedule": "linear"}}}, "stages.router.schedule='linear'; use one of"),
        ({"checkpoint": {"resume": "maybe"}}, "checkpoint.resume='maybe'"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(ValueError) as err:
        run_config_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def _ds(**changes) -> dict:
    ds = json.loads(ZERO2.read_text())
    for key, value in changes.items():
        ds[key] = value
    return ds


@pytest.mark.parametrize(
    "ds, world, accel, message",
    [
        (
            _ds(gradient_accumulation_steps=4),
            2,
            "cpu",
            "train_micro_batch_size_per_gpu (1) x gradient_accumulation_steps (4) x world size (2) = 8 but the run "
            "config's train.global_batch_size is 4; set gradient_accumulation_steps to 2 or omit it",
        ),
        (_ds(train_micro_batch_size_per_gpu=3), 1, "cpu", "global_batch_size 4 is not a multiple of"),
        (
            _ds(bf16={"enabled": True}),
            1,
            "cpu",
            "bf16.enabled is true but the run config's train.precision is fp32",
        ),
        (_ds(fp16={"enabled": True}), 1, "cpu", "fp16 is enabled"),
        (
            _ds(train_batch_size="auto"),
            1,
            "cpu",
            "'train_batch_size' is \"auto\", which only the HF Trainer fills",
        ),
        (_ds(scheduler={"type": "WarmupLR"}), 1, "cpu", "remove the `scheduler` block"),
        (_ds(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}), 1, "cpu", "torch_adam must be true"),
    ],
)
def test_ds_config_cross_checks(ds, world, accel, message):
    run = run_config_from_dict({"model": {"path": "m"}, "train": {"global_batch_size": 4}})
    with pytest.raises(ValueError) as err:
        resolve_ds_config(ds, run, world, accel, "zero2.json")
    assert message in str(err.value) and str(err.value).startswith("zero2.json: ")


def test_ds_config_bf16_on_cpu_and_zero_stage_and_derived_accumulation():
    bf16 = run_config_from_dict(
        {"model": {"path": "m"}, "train": {"precision": "bf16", "global_batch_size": 8}}
    )
    ds = _ds(bf16={"enabled": True})
    with pytest.raises(ValueError, match="bf16 is enabled but the accelerator is cpu"):
        resolve_ds_config(ds, bf16, 1, "cpu")
    assert resolve_ds_config(ds, bf16, 2, "cuda")["gradient_accumulation_steps"] == 4
    z2_only = run_config_from_dict({"model": {"path": "m"}, "train": {"zero_stages": [2]}})
    with pytest.raises(ValueError, match=r"ZeRO stage 3 is not allowed by train.zero_stages \[2\]"):
        resolve_ds_config(json.loads(ZERO3.read_text()), z2_only, 1, "cpu")
    resolved = resolve_ds_config(json.loads(ZERO2.read_text()), z2_only, 2, "cpu")
    assert (
        resolved["train_micro_batch_size_per_gpu"],
        resolved["gradient_accumulation_steps"],
        resolved["train_batch_size"],
    ) == (1, 4, 8)


def test_shipped_configs_are_strict_and_valid():
    run = run_config_from_dict(read_mapping(REPO / "configs" / "demo_retrain.yaml"))
    assert [s.name for s in run.enabled_stages()] == ["router", "experts"]
    for name in ("slurm_tiny.yaml", "dive_70b.yaml"):
        other = run_config_from_dict(read_mapping(REPO / "configs" / name))
        assert [s.name for s in other.enabled_stages()] == ["router", "experts"]
    assert resolve_ep_size(json.loads(ZERO3.read_text()), run) == 2
    assert resolve_ep_size(json.loads((REPO / "ds_configs" / "zero2_ep.json").read_text()), run) == 2
    assert resolve_ep_size(json.loads(ZERO2.read_text()), run) is None
    for name in ("zero2.json", "zero2_ep.json", "zero3.json", "zero3_offload.json"):
        ds = json.loads((REPO / "ds_configs" / name).read_text())
        resolve_ds_config(ds, run, 1, "cpu", name)
        assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    z3 = json.loads(ZERO3.read_text())["zero_optimization"]
    assert z3["stage"] == 3 and z3["leaf_module"]["classes"] == ["dive_ds.models.moe.DiveMoeBlock"]


@pytest.mark.parametrize(
    "ceiling,world,experts,want",
    [
        (2, 1, 6, 1),
        (2, 2, 6, 2),
        (2, 4, 6, 2),
        (2, 3, 6, 1),
        (8, 8, 8, 8),
        (8, 8, 6, 2),
        (8, 4, 8, 4),
        (8, 12, 6, 6),
        (8, 10, 6, 2),
    ],
)
def test_ep_size_from_the_json_follows_the_launch(ceiling, world, experts, want):
    """The JSON's autoep_size is a ceiling: the largest size <= it dividing the ranks and the experts."""
    run = run_config_from_dict({"model": {"path": "m"}})
    ds = json.loads(ZERO3.read_text()) | {"expert_parallel": {"enabled": True, "autoep_size": ceiling}}
    got = launch_ep_size(ds, run, world, experts, "z3.json")
    assert (got["size"], got["configured"], got["from"]) == (
        want,
        ceiling,
        "z3.json expert_parallel.autoep_size",
    )
    assert (got["note"] is None) == (want == ceiling)
    if got["note"]:
        assert got["note"].startswith(
            f"expert parallel {want} instead of z3.json expert_parallel.autoep_size"
        )
    assert launch_ep_size(json.loads(ZERO2.read_text()), run, world, experts)["size"] is None


def test_explicit_ep_size_that_cannot_work_is_refused_in_one_line():
    ds = json.loads(ZERO3.read_text())
    for ep, world, experts, msg in [
        (2, 1, 4, "parallel.ep_size=2 with 1 rank(s): the expert-parallel size must divide the world size"),
        (4, 4, 6, "parallel.ep_size=4 with 6 experts per layer: every rank must hold the same number"),
    ]:
        run = run_config_from_dict({"model": {"path": "m"}, "parallel": {"ep_size": ep}})
        with pytest.raises(ValueError, match=re.escape(msg)) as err:
            launch_ep_size(ds, run, world, experts)
        assert "\n" not in str(err.value)
    fits = run_config_from_dict({"model": {"path": "m"}, "parallel": {"ep_size": 2}})
    assert launch_ep_size(ds, fits, 4, 6) == {
        "size": 2,
        "configured": 2,
        "from": "parallel.ep_size",
        "note": None,
    }
    off = run_config_from_dict({"model": {"path": "m"}, "parallel": {"ep_size": 1}})
    assert launch_ep_size(ds, off, 1, 4)["size"] == 1


@pytest.mark.heavy
def test_design_card_command_on_one_rank_with_the_deepspeed_launcher(world, tiny, tmp_path):
    """`deepspeed launchers/retrain.py --deepspeed ds_configs/zero3.json --config configs/demo_retrain.yaml`
    on 1 rank: zero3.json asks for EP 2, the launch gets EP 1 (said once, recorded), both stages run. Sizes
    come down with --set only; an explicit parallel.ep_size=2 is refused before any work."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    tiny_sets = [
        f"out_dir={out}", f"model.path={tiny['model']}", f"data.registry={tiny['registry']}",
        "data.tokenizer=bytes", "data.seq_len=32", "data.shuffle_buffer=16", "train.global_batch_size=2",
        "stages.router.steps=1", "stages.experts.steps=1", "eval.windows_per_domain=1", "eval.batch_size=1",
        "logging.progress=false",
    ]  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(port),
           "launchers/retrain.py", "--deepspeed", "ds_configs/zero3.json", "--config", "configs/demo_retrain.yaml",
           *[a for s in tiny_sets for a in ("--set", s)]]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )  # a hang guard; ~30 s alone, 156 s measured on a loaded 2-core machine
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    note = "expert parallel 1 instead of ds_configs/zero3.json expert_parallel.autoep_size=2"
    assert proc.stdout.count(note) == 1, proc.stdout[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1
    assert info["expert_parallel"] == {
        "size": 1, "configured": 2, "from": "ds_configs/zero3.json expert_parallel.autoep_size"
    }  # fmt: skip
    assert {(st, n) for st, n in step_losses(out)} == {("router", 1), ("experts", 1)}
    assert (out / "model" / "config.json").is_file()
    from dive_ds.train.retrain import train  # the same run, explicitly EP 2: refused before any work

    explicit = load_run_config(
        REPO / "configs" / "demo_retrain.yaml", [*tiny_sets, f"out_dir={out}2", "parallel.ep_size=2"]
    )
    with pytest.raises(
        ValueError, match=re.escape("parallel.ep_size=2 with 1 rank(s): the expert-parallel size")
    ):
        train(explicit, read_mapping(ZERO3), "ds_configs/zero3.json")
    assert not (out.parent / "run2").exists()


def test_resume_with_another_ep_size_is_refused_before_loading(world, tiny, tmp_path):
    """A checkpoint saved under EP 2 (2 ranks), relaunched on 1 rank where zero3.json now gives EP 1."""
    from dive_ds.train.identity import run_identity, write_identity
    from dive_ds.train.retrain import train

    raw = base_run(tiny, tmp_path / "run")
    run = run_config_from_dict(raw)
    tag = tmp_path / "run" / "stages" / "router" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    write_identity(tmp_path / "run", run_identity(run))  # this very run's folder, as its first launch left it
    (tag / "dive_ds_stage.json").write_text(json.dumps({"ep_size": 2, "world_size": 2}))
    (tag.parent / "latest").write_text(tag.name)
    with pytest.raises(ValueError, match="was saved with expert parallel 2 and this launch has 1; relaunch"):
        train(run, read_mapping(ZERO3), "ds_configs/zero3.json")
    assert not (tmp_path / "run" / "run_info.json").exists()


def test_launcher_reports_one_line_errors(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import retrain as launcher
    finally:
        sys.path.pop(0)
    bad = write_yaml({"model": {"path": "m"}, "stagse": {}}, tmp_path / "bad.yaml")
    assert launcher.main(["--deepspeed", str(ZERO2), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retrain: error: run config: unknown key 'stagse'") and "\n" not in err
    assert launcher.main(["--deepspeed", str(ZERO2)]) == 2
    assert "pass --deepspeed CONFIG.json and --config RUN.yaml" in capsys.readouterr().err


def test_missing_checkpoint_and_missing_model_fail_early(tiny, tmp_path):
    from dive_ds.train.retrain import train

    raw = base_run(tiny, tmp_path / "run", checkpoint={"resume": "required"})
    with pytest.raises(
        ValueError, match=r"checkpoint.resume is 'required' but .*checkpoints holds no checkpoint"
    ):
        train(run_config_from_dict(raw), read_mapping(ZERO2))
    raw = base_run(tiny, tmp_path / "run", model={"path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        train(run_config_from_dict(raw), read_mapping(ZERO2))
    raw = base_run(tiny, tmp_path / "run")
    with pytest.raises(ValueError, match="run --stages router first"):
        train(run_config_from_dict(raw), read_mapping(ZERO2), stages=["experts"])


# --------------------------------------------------------------------------- data


def _stream(tiny, **data) -> PackedStream:
    raw = base_run(tiny, Path("unused"), data=data)
    return build_stream(run_config_from_dict(raw).data, ByteTokenizer())


def test_stream_is_deterministic_resumable_and_bounded(tiny):
    a, b = _stream(tiny), _stream(tiny)
    first = [a.next_sequence() for _ in range(40)]
    assert first == [b.next_sequence() for _ in range(40)]
    assert all(len(t) == 32 for _, t in first) and {d for d, _ in first} == {0, 1}
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores (tiny, JSON-safe)
    tail = [a.next_sequence() for _ in range(200)]  # runs over several epochs of both domains
    resumed = _stream(tiny)
    resumed.load_state_dict(state)
    assert [resumed.next_sequence() for _ in range(200)] == tail
    assert state["sequences"] == 40 and set(state["domains"]) == {"prose", "code"}
    other_seed = _stream(tiny, seed=7)
    assert [other_seed.next_sequence() for _ in range(40)] != first


def test_stream_mixture_weights_and_holdout(tiny):
    s = _stream(tiny, weights={"prose": 3.0, "code": 1.0})
    domains = [s.next_sequence()[0] for _ in range(400)]
    assert 0.68 < domains.count(0) / 400 < 0.82
    text = bytes(t for _ in range(300) for t in s.next_sequence()[1] if t < 256).decode("utf-8", "replace")
    data = run_config_from_dict(base_run(tiny, Path("u"))).data
    domains_, _ = resolve_domains(data)
    parts = split_texts(list(iter_documents(domains_[0])), data.split)
    marker = lambda seg: seg.text.split(">")[0] + ">"  # noqa: E731  "<prose doc 17>"
    trained, held = (
        {marker(g) for g in parts["train"]},
        {marker(g) for r in ("calib", "select", "eval") for g in parts[r]},
    )
    assert trained and held and any(t in text for t in trained) and not any(h + " " in text for h in held)
    w = heldout_windows(domains_[0], ByteTokenizer(), 32, 3, data.split)
    starts = {bytes(r[:17].tolist()).decode(errors="replace").split(">")[0] + ">" for r in w}
    assert w.shape == (3, 32) and starts <= {marker(g) for g in parts["eval"]}  # spread over the eval set


def test_overfit_stream_repeats():
    from dive_ds.data.registry import Domain, DomainSource
    from dive_ds.train.config import DataConfig

    cfg = DataConfig(seq_len=8, overfit_sequences=2, tokenizer="bytes")
    dom = Domain("d", DomainSource(type="local"))

    class Tiny(PackedStream):
        pass

    s = Tiny(cfg, [dom], __import__("numpy").array([1.0]), ByteTokenizer())
    s.streams[0]._docs = iter(["abcdefghijklmnopqrstuvwxyz"] * 3)
    s.streams[0]._tokens = list(b"abcdefghijklmnopqrstuvwxyz") + [256]
    s._overfit = [s._fresh(i) for i in range(2)]
    seqs = [s.next_sequence() for _ in range(5)]
    assert seqs[0] == seqs[2] == seqs[4] and seqs[1] == seqs[3] and seqs[0] != seqs[1]


def test_lr_schedule():
    from dive_ds.train.schedule import lr_factor

    stage = StageConfig(name="experts", steps=100, schedule="cosine", warmup_ratio=0.03, min_lr_ratio=0.1)
    f = lr_factor(stage, 100)
    assert [round(f(s), 6) for s in (0, 1, 2)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    assert (
        f(3) == pytest.approx(1.0) and f(99) == pytest.approx(0.1, abs=1e-3) and f(100) == pytest.approx(0.1)
    )
    assert f(51) == pytest.approx(0.55, abs=0.01)
    const = lr_factor(StageConfig(steps=10, schedule="constant"), 10)
    assert {const(s) for s in range(10)} == {1.0}


# --------------------------------------------------------------------------- training


def test_router_stage_trains_only_routers_and_loss_falls(memorise_run, tiny):
    out = memorise_run["out"]
    before = state_hashes(load_state(tiny["model"]))
    after = state_hashes(load_state(out / "stages" / "router" / "model"))
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    losses = [v for (stage, _), v in sorted(step_losses(out).items()) if stage == "router"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.05, losses


def test_experts_stage_trains_only_lora_routers_norms_and_loss_falls(memorise_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = memorise_run["out"]
    before = state_hashes(load_state(out / "stages" / "router" / "model"))
    ckpt = out / "stages" / "experts" / "checkpoints"
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # unmerged: LoRA still separate
    after = state_hashes(trained)
    lora = {k for k in after if ".lora_" in k}
    assert len(lora) == 2 * 4
    assert all(trained[k].abs().sum() > 0 for k in lora if k.endswith("_B"))  # B moved away from zero
    changed = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    allowed = {k for k in before if ".mlp.gate." in k or "norm" in k}
    assert (
        changed <= allowed
        and any("norm" in k for k in changed)
        and any(".mlp.gate.weight" in k for k in changed)
    )
    assert not any("self_attn" in k or "embed" in k or "experts.gate_up_proj" in k for k in changed)
    losses = [v for (stage, _), v in sorted(step_losses(out).items()) if stage == "experts"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.05, losses
    start = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if '"stage_start"' in r]
    experts = next(r for r in start if r["stage"] == "experts")["trainable"]
    assert set(experts["by_kind"]) == {"lora", "router", "router_noise", "norm"}
    assert experts["trainable"] == sum(experts["by_kind"].values()) < experts["total"]


def test_final_model_is_plain_hf_and_matches_live_eval(memorise_run):
    from transformers import AutoModelForCausalLM

    from dive_ds.train.evaluation import eval_windows, evaluate, summarise_eval

    out, run = memorise_run["out"], memorise_run["run"]
    final = out / "model"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(model).__name__ == "DiveMoeForCausalLM" and model.config.router_mode == "sparse"
    assert not any("lora" in n for n, _ in model.named_parameters())
    windows = eval_windows(run, ByteTokenizer(), 260)
    hf = summarise_eval(evaluate(lambda ids: model(input_ids=ids).logits, windows, 2, torch.device("cpu")))
    live = memorise_run["results"]["experts"]["final_eval"]
    assert hf["loss"] == pytest.approx(live["loss"], abs=1e-6)
    assert hf["ppl"] == pytest.approx(live["ppl"], rel=1e-5)


def test_saved_model_keeps_the_gate_the_stage_trained_with(world, tiny, tmp_path):
    """An experts stage trained with router_gate=switch saves a model whose config says switch (not the
    input's gate), so the saved model's perplexity is the one the trainer measured live."""
    from transformers import AutoModelForCausalLM

    from dive_ds.train.evaluation import eval_windows, evaluate, summarise_eval
    from dive_ds.train.retrain import train

    out = tmp_path / "run"
    raw = base_run(tiny, out, data={"overfit_sequences": 4}, eval={"every": 2},
                   stages={"router": {"enabled": False}, "experts": {"steps": 2, "router_gate": "switch"}})  # fmt: skip
    run = run_config_from_dict(raw)
    results = train(run, read_mapping(ZERO2), str(ZERO2))
    assert json.loads((tiny["model"] / "config.json").read_text()).get("router_gate") != "switch"
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert model.config.router_gate == "switch"
    windows = eval_windows(run, ByteTokenizer(), 260)
    hf = summarise_eval(evaluate(lambda ids: model(input_ids=ids).logits, windows, 2, torch.device("cpu")))
    live = results["experts"]["final_eval"]
    assert hf["loss"] == pytest.approx(live["loss"], abs=1e-6)


def test_a_run_without_evaluation_scores_nothing(world, tiny, tmp_path, monkeypatch, capsys):
    """eval.at_start / every / at_end all off (the demo, which scores the retrained model itself): no
    held-out windows are built, no eval rows, final_eval is null, and the model is written as ever."""
    import dive_ds.train.retrain as retrain_mod
    from dive_ds.train.retrain import train

    built = []
    monkeypatch.setattr(retrain_mod, "eval_windows", lambda *a: built.append(a) or {})
    out = tmp_path / "run"
    raw = base_run(tiny, out, data={"overfit_sequences": 4}, eval={"every": 0, "at_start": False, "at_end": False},
                   stages={"router": {"enabled": False}, "experts": {"steps": 2}})  # fmt: skip
    results = train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    assert built == [] and results["experts"]["final_eval"] is None
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("event") == "eval"] and [r["step"] for r in rows if "loss" in r] == [
        1,
        2,
    ]
    assert json.loads((out / "stages" / "experts" / "summary.json").read_text())["final_eval"] is None
    assert f"[experts] done: model -> {out / 'stages' / 'experts' / 'model'}" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()


def test_run_folder_records_and_tensorboard(memorise_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = memorise_run["out"]
    assert (out / "run_config.yaml").is_file() and (out / "ds_config.json").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert {"dive_ds", "torch", "deepspeed", "transformers"} <= set(info["versions"]) and "git_rev" in info
    assert info["data_recipe"]["seq_len"] == 32 and set(info["data_recipe"]["domains"]) == {"prose", "code"}
    assert json.loads((out / "ds_config.json").read_text())["gradient_accumulation_steps"] == 4
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "train/tokens_per_s",
        "train/step_time_s",
        "train/aux_loss",
        "train/aux_loss_coef",
        "moe/load_cv_mean",
        "moe/load_cv/layer_00",
        "moe/load_cv/layer_01",
        "moe/load/layer_00/expert_00",
        "moe/load/layer_01/expert_03",
        "moe/router_entropy/layer_00",
        "moe/router_entropy_mean",
        "eval/ppl/prose",
        "eval/ppl/code",
        "eval/ppl_mean",
        "eval/loss",
    }
    assert want <= tags, want - tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 21))  # router steps 1-10, experts 11-20 (global steps)
    tokens = acc.Scalars("train/tokens_seen")
    assert tokens[9].value == 10 * 4 * 32 and tokens[-1].value == 10 * 4 * 32
    shares = [acc.Scalars(f"moe/load/layer_00/expert_{e:02d}")[-1].value for e in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert acc.Scalars("train/aux_loss_coef")[-1].value == pytest.approx(0.01)
    assert {e.step for e in acc.Scalars("eval/ppl/prose")} == {0, 5, 10, 15, 20}  # 0 and 10: stage baselines
    assert "moe/expert_load_heatmap" in acc.Tags()["images"]


@pytest.fixture(scope="module")
def resume_reference(world, tiny, tmp_path_factory):
    """zero -> (DeepSpeed JSON, run config, output folder) of the uninterrupted reference run of the resume
    tests, run in-process on first use and shared by every crash variant of that ZeRO setting (the
    reference does not depend on how its copy is later interrupted)."""
    from dive_ds.train.retrain import train

    done = {}

    def get(zero: str) -> tuple[Path, dict, Path]:
        if zero not in done:
            root = tmp_path_factory.mktemp(f"resume-{zero}")
            if zero == "zero2":
                ds, extra = ZERO2, {}
            else:
                ds, extra = (
                    write_ds(ZERO3, root / "zero3.json", stage3_param_persistence_threshold=0),
                    {"exclude_frozen": True},
                )
            raw = base_run(tiny, root / "reference", train={"rng_per_micro_batch": False}, checkpoint=extra)
            # uninterrupted, in-process, with the thread count of the relaunched subprocesses
            # (subprocess_env sets OMP_NUM_THREADS=1; another count changes the fp32 reduction order)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(run_config_from_dict(raw), read_mapping(ds), str(ds))
            finally:
                torch.set_num_threads(threads)
            done[zero] = (ds, raw, root / "reference")
        return done[zero]

    return get


@pytest.mark.parametrize(
    "zero,crash",
    [
        ("zero2", "experts:3"),
        ("zero3-exclude-frozen", "experts:3"),
        ("zero2", "experts:4:save"),
        ("zero2", "stop-file"),
    ],
)
@pytest.mark.heavy
def test_resume_after_crash_reproduces_every_loss(zero, crash, resume_reference, tmp_path):
    """Kill the launcher right after experts step 3 (checkpoint at 2), relaunch: identical losses, step by step.

    `experts:4:save` kills it inside step 4's checkpoint save, after DeepSpeed wrote its files and before
    the commit: the torn step_00000004 must be ignored (`latest` still names step 2) and replaced.
    `stop-file` touches OUT/STOP during the experts stage: exit 143 after a checkpoint of that step, a
    relaunch refuses while the file is there, and resumes once it is removed.

    train.rng_per_micro_batch is off, so the noise and dropout after the resume depend on the RNG states
    restored from the checkpoint. The zero3 variant partitions every parameter and saves checkpoints
    without the frozen weights (checkpoint.exclude_frozen).
    """
    ds, raw, reference = resume_reference(zero)
    raw = dict(raw, out_dir=str(tmp_path / "run"))
    cfg = write_yaml(raw, tmp_path / "run.yaml")
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "retrain.py"),
        "--deepspeed",
        str(ds),
        "--config",
        str(cfg),
    ]
    ckpt_dir = tmp_path / "run" / "stages" / "experts" / "checkpoints"
    if crash == "stop-file":  # what slurm/common.sh does on pre-emption: touch OUT/STOP mid-stage
        first = subprocess.Popen(
            cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        end = time.monotonic() + 300
        while time.monotonic() < end and first.poll() is None:
            metrics = tmp_path / "run" / "metrics.jsonl"
            if metrics.is_file() and any(
                st == "experts" and n >= 1 for st, n in step_losses(tmp_path / "run")
            ):  # at the stage's first step: touched at step 3, a quiet machine once finished first (exit 0)
                (tmp_path / "run" / "STOP").touch()
                break
            time.sleep(0.2)
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 143, stderr[-3000:]
        assert "stopped after step" in stderr
        stopped = max(n for st, n in step_losses(tmp_path / "run") if st == "experts")
        assert 1 <= stopped < 6
        resume_at = f"step_{stopped:08d}"  # the stop checkpoints the step it stopped at
        assert (ckpt_dir / "latest").read_text().strip() == resume_at
        refused = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "STOP exists: a stop request" in refused.stderr, refused.stderr
        (tmp_path / "run" / "STOP").unlink()
    else:
        first = subprocess.run(
            cmd,
            env=subprocess_env(DIVE_DS_TEST_CRASH_AFTER_STEP=crash),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.returncode == 3, first.stderr[-3000:]
        resume_at = "step_00000002"
        assert (ckpt_dir / "latest").read_text().strip() == resume_at
        torn = ckpt_dir / "step_00000004"
        assert torn.is_dir() == crash.endswith(
            ":save"
        )  # DeepSpeed's files of the interrupted save, uncommitted
    assert not (tmp_path / "run" / "model").exists()
    second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[router] already done" in second.stdout and "resumed from" in second.stdout
    assert ("ignoring step_00000004" in second.stdout) == crash.endswith(":save"), second.stdout
    assert f"{resume_at} at step {int(resume_at[5:])}" in second.stdout
    resumed, want = step_losses(tmp_path / "run"), step_losses(reference)
    assert resumed.keys() == want.keys() and len(want) == 10
    assert resumed == want  # exact on CPU fp32
    ckpts = sorted(p.name for p in ckpt_dir.glob("step_*"))
    assert len(ckpts) == 2 and ckpts[-1] == "step_00000006"  # keep = 2
    final, ref_final = load_state(tmp_path / "run" / "model"), load_state(reference / "model")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


@pytest.mark.heavy
def test_a_stop_during_a_long_step_ends_within_a_micro_batch_and_resumes_exactly(
    resume_reference, tmp_path, monkeypatch
):
    """A stop request (what SIGTERM sets) arriving during the first micro batch of experts step 3 (4 micro a
    batches a step here): no further micro batch runs, the checkpoint is of step 2 (the last complete one, data
    stream and RNGs rewound to its end), and the relaunch reproduces the uninterrupted run's every loss."""
    import dive_ds.train.stage as stage_mod
    from dive_ds.train.retrain import train
    from dive_ds.train.stop import Interrupted

    ds, raw, reference = resume_reference("zero2")
    raw = dict(raw, out_dir=str(tmp_path / "run"))
    real, calls = stage_mod._forward, {"n": 0, "after": 0}
    stop_file = tmp_path / "run" / "STOP"

    def forward(engine, ids, *a):
        calls["n"] += 1
        if stop_file.exists():
            calls["after"] += 1
        # experts stage: 4 router steps x 4 micro batches come first; step 3's first micro batch is call 25
        if calls["n"] == 4 * 4 + 2 * 4 + 1:
            stop_file.touch()
        return real(engine, ids, *a)

    monkeypatch.setattr(stage_mod, "_forward", forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Interrupted, match="stopped after step 2, part-way through step 3"):
            train(run_config_from_dict(raw), read_mapping(ds), str(ds))
        assert calls["after"] == 0  # the touch came inside micro batch 1; micro batch 2 never ran
        ckpt = tmp_path / "run" / "stages" / "experts" / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == "step_00000002"
        stop_file.unlink()
        monkeypatch.setattr(stage_mod, "_forward", real)
        train(run_config_from_dict(raw), read_mapping(ds), str(ds))
    finally:
        torch.set_num_threads(threads)
    assert step_losses(tmp_path / "run") == step_losses(reference)
