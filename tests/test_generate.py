"""`python -m launcher.generate`: greedy output equals our own model's greedy decoding; seeds
make sampling reproducible; bad arguments are one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from core.cli import run_main
from export import generate
from export.consolidate import consolidate, resolve_tag
from model import Transformer
from run.config import load_run_config
from tests.ds_run_fixture import EOT, ROOT

PROMPT = "To be, or not"


# `runs` and `exports` (RUN_DIR/hf of each) come from conftest.py.


def native_continuation(run_dir: Path, n: int) -> list[int]:
    """Greedy decoding with our Transformer, from <|endoftext|> + the prompt's tokens."""
    cfg = load_run_config(run_dir / "config.yaml").model
    sd = dict(consolidate(resolve_tag(run_dir, None), cfg).state_dict)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    ids = torch.tensor([[tok.token_to_id(EOT), *tok.encode(PROMPT).ids]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, start:].tolist()
    eot = tok.token_to_id(EOT)
    return new[: new.index(eot) + 1] if eot in new else new  # generate stops at eos


def test_greedy_matches_our_model(runs, exports):
    model, tokenizer = generate.load(exports["none"])
    got = generate.generate_ids(model, tokenizer, PROMPT, generate.Sampling(max_new_tokens=8, temperature=0))
    assert got == native_continuation(runs["none"], 8)


def test_sampling_is_seeded_and_top_k_1_is_greedy(exports):
    model, tokenizer = generate.load(exports["none"])

    def sample(**kw):
        return generate.generate_ids(model, tokenizer, PROMPT, generate.Sampling(max_new_tokens=12, **kw))

    assert sample(temperature=1.0, seed=3) == sample(temperature=1.0, seed=3)
    assert sample(temperature=1.0, top_k=1, seed=5) == sample(temperature=0)
    draws = {tuple(sample(temperature=2.0, top_k=0, seed=s)) for s in range(4)}
    assert len(draws) > 1  # sampling really samples


def test_cli_with_remote_code_in_a_fresh_process(runs, exports, tmp_path):
    folder = exports["qkv"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    argv = ["--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.generate", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = Tokenizer.from_file(str(runs["qkv"] / "tokenizer.json"))
    expected = PROMPT + tok.decode(native_continuation(runs["qkv"], 6), skip_special_tokens=True)
    assert proc.stdout == expected + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-k", "-2"], "--top-k"),
        (["--prompt", "x" * 200], "--prompt"),
    ],
)
def test_bad_arguments_are_one_line_errors(extra, message, exports, capsys):
    argv = ["--model", str(exports["none"]), "--prompt", PROMPT, *extra]
    assert run_main(generate.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_model_folder_without_config_is_a_one_line_error(tmp_path, capsys):
    assert run_main(generate.main, ["--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and err.count("\n") == 1
