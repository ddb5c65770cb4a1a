"""Load exports the way a user would, in a fresh process, and record what they compute.

    python tests/hf_load_check.py REQUEST.json RESULT.pt

REQUEST.json: {"exports": [{"name", "folder", "remote", "input_ids"}], "text": str}.
Run it with the working directory outside the project, no PYTHONPATH, HF_HUB_OFFLINE=1 and
an empty HF_HOME, so that only transformers, torch and the export folder are involved:
the remote-code file must be self-contained for qkv/row to load at all.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def check(entry: dict, text: str) -> dict:
    folder, remote = entry["folder"], entry["remote"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    ids = torch.tensor(entry["input_ids"])
    prompt = ids[:1, :4]
    greedy = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        logits = model(ids).logits
        cached = model.generate(prompt, use_cache=True, **greedy)
        uncached = model.generate(prompt, use_cache=False, **greedy)
    encoded = tokenizer(text)["input_ids"]
    return {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "dtype": str(next(model.parameters()).dtype),
        "logits": logits.float(),
        "cached": cached[0, prompt.shape[1] :].tolist(),
        "uncached": uncached[0, prompt.shape[1] :].tolist(),
        "encoded": encoded,
        "decoded": tokenizer.decode(encoded),
        "eos_token_id": tokenizer.eos_token_id,
        "generation_eos": model.generation_config.eos_token_id,
    }


def main(request_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    request = json.loads(open(request_file, encoding="utf-8").read())
    results = {e["name"]: check(e, request["text"]) for e in request["exports"]}
    torch.save(results, result_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
