"""`dive-ds evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.argtypes import int_at_least, nonneg_int, positive_int
from dive_ds.commands.common import DeviceFlags
from dive_ds.flags import flag, nested

HELP = "held-out perplexity per domain (router and oracle routing); lm-eval task accuracy"
DESCRIPTION = (
    "Perplexity on each domain's held-out windows (from the calibration folder), their mean, total and "
    "activated parameters. For a DIVE MoE also the 'oracle' routing (each domain's tokens to its group's "
    "expert) and the expert load. With --tasks, zero-shot accuracy (acc, acc_norm, stderr, 95% interval) "
    "through lm-evaluation-harness."
)


@dataclass
class Settings:
    model: str = flag(None, "model folder (dense or dive_moe), or `demo`", positional=True)
    calib: str | None = flag(None, "calibration folder whose held-out windows are used")
    domains: str | None = flag(None, "or: a domain registry (or `demo`); held-out windows are drawn from it with "
                               "calibrate's split, so the same --seed/--seq-len/--eval-windows never touch "
                               "calibration text")  # fmt: skip
    seq_len: int = flag(256, "with --domains: tokens per window (default 256)", type=int_at_least(2))
    seed: int = flag(42, "with --domains: sampling seed (default 42)", type=nonneg_int)
    eval_windows: int | None = flag(None, "windows per domain (default: all of --calib; 16 with --domains)",
                                    type=positive_int)  # fmt: skip
    no_oracle: bool = flag(False, "skip the oracle routing")
    tasks: str | None = flag(None, "comma-separated lm-eval tasks for zero-shot accuracy through lm-evaluation-"
                             "harness: offline dive_logiqa, dive_medmcqa (evals package), dive_lambada "
                             "(LAMBADA-style last word of KJV narrative, evaluation split), or any lm-eval task "
                             "or group by name (online: its data comes from the Hugging Face hub)")  # fmt: skip
    limit: int | None = flag(None, "with --tasks: only the first N items of each task (lm-eval --limit)",
                             type=positive_int)  # fmt: skip
    num_fewshot: int | None = flag(
        None, "with --tasks: few-shot examples (default: the task's, 0)", type=nonneg_int
    )
    whole_model: bool = flag(False, "perplexity with the whole model loaded in each process (default: streamed "
                             "layer by layer, one decoder layer resident, as calibration; --tasks always loads "
                             "the whole model)")  # fmt: skip
    batch_size: int = flag(8, "windows (or lm-eval requests) per forward (default 8)", type=positive_int)
    out: str | None = flag(None, "write eval.json, eval.md and TensorBoard scalars (tb/) here")
    run_on: DeviceFlags = nested(DeviceFlags)


def run(s: Settings) -> int:
    from dive_ds.build.evaluate import evaluation_markdown, run_evaluate
    from dive_ds.parallel.ranks import launched_world

    tasks = None
    if s.tasks is not None:
        from dive_ds.eval.downstream import parse_tasks

        tasks = parse_tasks(s.tasks)
    res = run_evaluate(
        s.model, s.calib, s.out, oracle=not s.no_oracle, batch_size=s.batch_size, eval_windows=s.eval_windows,
        registry=s.domains, seq_len=s.seq_len, seed=s.seed, tasks=tasks, limit=s.limit, num_fewshot=s.num_fewshot,
        device=s.run_on.device, dtype=s.run_on.dtype, streamed=not s.whole_model,
    )  # fmt: skip
    if launched_world()[0] == 0:  # every rank holds the same result; rank 0 prints it
        print(evaluation_markdown(res))
    return 0
