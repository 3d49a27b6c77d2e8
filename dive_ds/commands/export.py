"""`dive-ds export`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.flags import flag

HELP = "write a dive_moe checkpoint in a format that loads without dive_ds"
DESCRIPTION = None


@dataclass
class Settings:
    model: str = flag(None, "dive_moe checkpoint folder", positional=True)
    format: str = flag("mixtral", "mixtral: stock MixtralForCausalLM (expert biases must be zero, Llama/Mistral "
                       "attention); portable: the dive_moe folder with its own modeling code and auto_map, "
                       "loaded with trust_remote_code=True (default mixtral)",
                       choices=["mixtral", "portable"])  # fmt: skip
    out: str = flag(None, "output folder", required=True)


def run(s: Settings) -> int:
    from dive_ds.io.export import export_model

    export_model(s.model, s.out, s.format)
    print(f"exported {s.model} -> {s.out} (format {s.format})")
    return 0
