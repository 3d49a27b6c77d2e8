"""Start-up cost: the CLI parses (and answers --help or a bad flag) without torch or transformers,
and `import dive_ds` still makes "dive_moe" known to transformers' Auto classes."""

from __future__ import annotations

import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "deepspeed", "datasets", "lm_eval")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_and_every_help_load_no_heavy_module():
    r = _python(
        "import sys, contextlib, io\n"
        "import dive_ds\n"
        "from dive_ds.cli import build_parser, main\n"
        "p = build_parser()\n"
        "names = sorted(p._subparsers._group_actions[0].choices)\n"
        "for cmd in [[]] + [[n] for n in names]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main([*cmd, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0, (cmd, e.code)\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "    assert main(['mine', '--calib', 'c', '--experts', '2', '--out', 'o', '--bogus']) == 2\n"
        "assert '--bogus' in err.getvalue(), err.getvalue()\n"
        f"print(len(names), *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert r.returncode == 0, r.stderr
    n, *loaded = r.stdout.split()
    assert int(n) >= 10  # every command's --help was printed
    assert loaded == [], f"parsing the command line imported {loaded}"


def test_help_answers_fast():
    # the best of three, as timeit reports: `make test` runs a second pytest worker beside this one, whose
    # load can stretch any one start-up; the fastest start is the one this machine gives a user's shell
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "dive_ds.cli", "calibrate", "--help"], capture_output=True, text=True
        )
        took.append(time.perf_counter() - t0)
        assert r.returncode == 0 and "--samples-per-domain" in r.stdout
    took = min(took)
    assert took < 1.5, f"`dive-ds calibrate --help` took {took:.2f} s"


def test_auto_classes_know_dive_moe_after_import_dive_ds_in_any_order():
    orders = (
        ("dive_ds", "transformers"),
        ("transformers", "dive_ds"),
        ("dive_ds.models.moe", "transformers"),
    )
    code = (
        "import {first}, {second}\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "cfg = AutoConfig.for_model('dive_moe', vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,\n"
        "    num_experts_per_tok=1, expert_intermediate_size=16)\n"
        "m = AutoModelForCausalLM.from_config(cfg)\n"
        "print(type(m).__name__)\n"
    )
    procs = [  # three fresh interpreters at once (each pays the torch + transformers import)
        subprocess.Popen(
            [sys.executable, "-c", code.format(first=a, second=b)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for a, b in orders
    ]
    for order, p in zip(orders, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["DiveMoeForCausalLM"], (order, out)
