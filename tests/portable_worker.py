"""Loads portable dive_moe checkpoints in a Python that cannot import dive_ds (run by tests/test_portable.py).

    python -I -S tests/portable_worker.py SITE_PACKAGES IDS_FILE OUT_FILE FOLDER...

-I -S: no PYTHONPATH, no script folder, no site processing, so the editable install's path hook (a .pth
file in site-packages) never runs; only SITE_PACKAGES (torch, transformers) is put on the path. A finder
refuses dive_ds as well, for an environment where it is a regular install inside SITE_PACKAGES. Writes,
per folder i, `{i}.logits`, `{i}.hidden` (AutoModel's last hidden state), the sequences and step logits of greedy generate with the KV cache
(`{i}.cache`, `{i}.cache.logits`) and without it (`{i}.nocache...`) to OUT_FILE, and `{i}.tokens` (the
first row of ids as "w{id}" words, through the folder's tokenizer, if it has one), with a JSON report in
the file's metadata (stdout carries transformers' trust_remote_code prompt).
"""

import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path

sys.path.append(sys.argv[1])
on_path = importlib.util.find_spec("dive_ds") is not None


class RefuseDiveDs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dive_ds":
            raise ModuleNotFoundError(f"No module named {name!r} (refused by portable_worker)")
        return None


sys.meta_path.insert(0, RefuseDiveDs())
try:
    import dive_ds  # noqa: F401

    importable = True
except ModuleNotFoundError:
    importable = False

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ids = load_file(sys.argv[2])["ids"]
results, modules, refused = {}, [], []
for i, folder in enumerate(sys.argv[4:]):
    try:  # without the opt-in (stdin is closed, so transformers' prompt reads no "y")
        AutoModelForCausalLM.from_pretrained(folder)
        refused.append(False)
    except ValueError as e:
        refused.append("trust_remote_code=True" in str(e))
    if Path(folder, "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        words = " ".join(f"w{t}" for t in ids[0].tolist())
        results[f"{i}.tokens"] = tokenizer(words, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    modules += [f"{type(m).__module__}.{type(m).__name__}" for m in (model, base)]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
               return_dict_in_generate=True, output_logits=True)  # fmt: skip
    with torch.no_grad():
        results[f"{i}.logits"] = model(ids).logits
        results[f"{i}.hidden"] = base(ids).last_hidden_state
        for name, use_cache in (("cache", True), ("nocache", False)):
            out = model.generate(ids, use_cache=use_cache, **gen)
            results[f"{i}.{name}"] = out.sequences
            results[f"{i}.{name}.logits"] = torch.stack(out.logits, dim=1)  # [B, new tokens, V]
report = {
    "dive_ds_on_path": on_path,
    "dive_ds_importable": importable,
    "dive_ds_modules": sorted(m for m in sys.modules if m.split(".")[0] == "dive_ds"),
    "model_modules": modules,
    "refused_without_trust_remote_code": refused,
}
tensors = {k: v.contiguous() for k, v in results.items()}
save_file(tensors, sys.argv[3], metadata={"report": json.dumps(report)})
