"""A tokenizer whose end-of-text token is `</s>`, with a distinct `<|pad|>`, trains and exports;
transformers then reports the eos, bos and pad ids that training used, in the tokenizer, the
model config and the generation config alike."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.train_helpers import ROOT, check, env, fresh_process_env, run_single, tiny_overrides

# <|pad|> first and </s> last, so that neither id is a transformers default (Llama: bos 1, eos 2)
SPECIAL = ["<|pad|>", "<unk>", "<mask>", "</s>"]
EOS, PAD = "</s>", "<|pad|>"

LOAD_CHECK = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
got = {}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = lambda c: [c.eos_token_id, c.bos_token_id, c.pad_token_id]
    got[folder] = {"tokenizer": ids(tok), "config": ids(model.config), "generation": ids(model.generation_config),
                   "eos_token": tok.eos_token, "class": type(model).__name__}
print(json.dumps(got))
"""


def train_eos_tokenizer(corpus_glob: str, path: Path) -> Tokenizer:
    """A byte-level BPE without <|endoftext|>: it ends documents with </s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((p.read_text() for p in sorted(Path(corpus_glob).parent.glob("*.txt"))), trainer)
    path.parent.mkdir(parents=True)
    tok.save(str(path))
    return tok


def export(run_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "launcher.export_hf", "--run", str(run_dir)]
    check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120))
    return run_dir / "hf"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, Tokenizer]:
    """A tiny qkv run trained on the </s> tokenizer by launcher.train."""
    glob, cache = corpus
    tmp = tmp_path_factory.mktemp("eos_run")
    tok = train_eos_tokenizer(glob, tmp / "tok" / "tokenizer.json")
    extra = {"data.tokenizer": str(tmp / "tok" / "tokenizer.json"), "model.precondition": "qkv"}
    check(run_single(tiny_overrides(glob, cache, tmp / "run", **extra)))
    return tmp / "run", tok


def test_run_dir_keeps_the_prepared_tokenizer_folder(corpus, trained):
    run_dir, _ = trained
    kept = run_dir / "tokenizer"
    prepared = next((corpus[1] / "tokenizers").glob("*/tokenizer_config.json")).parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (kept / name).read_bytes() == (prepared / name).read_bytes(), name
    assert (run_dir / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    assert json.loads((kept / "tokenizer_config.json").read_text())["eos_token"] == EOS
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_export_carries_the_training_special_tokens(trained, tmp_path):
    """The new run directory, and a copy without tokenizer/ (as older runs wrote them), export
    with the ids training used: </s> as eos and bos, <|pad|> as pad."""
    run_dir, tok = trained
    old_style = tmp_path / "old_run"
    shutil.copytree(run_dir, old_style, ignore=shutil.ignore_patterns("tokenizer", "hf"))
    folders = [str(export(run_dir)), str(export(old_style))]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_CHECK, *folders], cwd=tmp_path, env=fresh_process_env(tmp_path),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = [tok.token_to_id(EOS), tok.token_to_id(EOS), tok.token_to_id(PAD)]
    assert expected == [3, 3, 0]
    for folder, got in json.loads(proc.stdout.splitlines()[-1]).items():
        assert got["tokenizer"] == got["config"] == got["generation"] == expected, folder
        assert got["eos_token"] == EOS and got["class"] == "PrecondLlamaForCausalLM"
        assert f"Documents were separated by `{EOS}`" in (Path(folder) / "README.md").read_text()
