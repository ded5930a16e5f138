"""A compressed transformers model through a folder and a fresh process: exact, compressed.

One subprocess loads every folder twice, with ``tnquant.load(folder)`` (no
``model=``) and with transformers' ``from_pretrained`` after
``tnquant.hf.register()``; the references are the in-memory compressed
models of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from tests.hf import models  # noqa: E402

AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModel"}
SENTENCE = "tensor networks make a model small"

CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file
import tnquant
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
import transformers

jobs = json.loads(sys.argv[1])
out = {"registered_by_import": "tnquant" in AUTO_QUANTIZER_MAPPING}
import tnquant.hf
out["registered_by_import_hf"] = "tnquant" in AUTO_QUANTIZER_MAPPING
tnquant.hf.register()

def describe(model, x, y, folder):
    tied = json.load(open(folder + "/model.json"))["tied"]
    state = model.state_dict()
    got = model(x)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    return {
        "class": type(model).__name__,
        "diff": (got - y).abs().max().item(),
        "tnquant": {n: type(m).__name__ for n, m in model.named_modules(remove_duplicate=False)
                    if type(m).__module__.startswith("tnquant")},
        "tied": [len({state[k].data_ptr() for k in group}) for group in tied],
        "dtypes": {k: str(v.dtype) for k, v in model.state_dict().items()},
        "meta": any(v.is_meta for v in model.state_dict().values()),
    }

for job in jobs:
    ref = load_file(job["ref"])
    x, y = ref["x"], ref["y"]
    res = {"load": describe(tnquant.load(job["folder"]), x, y, job["folder"])}
    auto = getattr(transformers, job["auto"])
    res["from_pretrained"] = describe(auto.from_pretrained(job["folder"]), x, y, job["folder"])
    if job["tokenizer"]:
        _, tok = tnquant.hf.load_pretrained(job["folder"])
        res["ids"] = tok(job["sentence"])["input_ids"]
    out[job["name"]] = res
print("RESULT" + json.dumps(out))
"""


def _tnquant_modules(model: torch.nn.Module) -> dict[str, str]:
    return {
        n: type(m).__name__
        for n, m in model.named_modules(remove_duplicate=False)
        if type(m).__module__.startswith("tnquant")
    }


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    from transformers import AutoTokenizer

    from tnquant.cli.datasets import minilm_path

    root = tmp_path_factory.mktemp("hf")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    jobs, expected = [], {}
    for name in AUTO:
        vocab = tokenizer.vocab_size if name == "bert" else models.VOCAB
        folder = root / name
        model = models.saved(name, folder, tokenizer if name == "bert" else None, vocab)
        x = models.inputs(vocab)
        with torch.no_grad():
            y = models.logits(model, x)
        save_file({"x": x, "y": y.contiguous()}, str(root / f"{name}_ref.safetensors"))
        expected[name] = {
            "class": type(model).__name__,
            "tnquant": _tnquant_modules(model),
            "dtypes": {k: str(v.dtype) for k, v in model.state_dict().items()},
        }
        jobs.append(
            {
                "name": name,
                "folder": str(folder),
                "ref": str(root / f"{name}_ref.safetensors"),
                "auto": AUTO[name],
                "tokenizer": name == "bert",
                "sentence": SENTENCE,
            }
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    ids = tokenizer(SENTENCE)["input_ids"]
    return json.loads(line[len("RESULT") :]), expected, {"ids": ids}


@pytest.mark.parametrize("name", list(AUTO))
@pytest.mark.parametrize("how", ["load", "from_pretrained"])
def test_fresh_process_gives_the_same_compressed_model(round_trip, name: str, how: str) -> None:
    results, expected, _ = round_trip
    got = results[name][how]
    assert got["class"] == expected[name]["class"]
    assert got["diff"] == 0.0
    assert got["tnquant"] == expected[name]["tnquant"]  # tnquant's converted modules, not floats
    assert "FrozenTensor" in got["tnquant"].values()
    if name == "llama":
        assert "LowRankLinear" in got["tnquant"].values()
    if name == "gpt2":
        assert got["tnquant"]["transformer.h.0.mlp.c_fc"] == "LowRankHFConv1D"
    assert got["dtypes"] == expected[name]["dtypes"]  # packed integer codes stay integer
    assert any(d in ("torch.uint8", "torch.int8") for d in got["dtypes"].values())
    assert not got["meta"]
    assert all(count == 1 for count in got["tied"])  # tied when saved: one tensor again
    if name == "gpt2":
        assert got["tied"]  # lm_head and wte share their codes


def test_import_registers_nothing_and_the_tokenizer_comes_back(round_trip) -> None:
    results, _, tok = round_trip
    assert results["registered_by_import"] is False
    assert results["registered_by_import_hf"] is False
    assert results["bert"]["ids"] == tok["ids"]
