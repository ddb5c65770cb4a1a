"""The GGUF path (export/gguf.py): llama.cpp's converter, fetched from the registry's source
package, turns the qk export (a stock Qwen3) into a GGUF whose tensors are the export's and
whose pre-tokenizer is GPT-2's; the remote-code exports are refused in one line. The logits
check against transformers runs where llama-cpp-python is installed (a 9-minute build, not
part of the suite's set-up; docs/export.md has its numbers)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from core.cli import run_main
from export import gguf
from tests.train_helpers import ROOT


def test_our_tokenizer_splits_like_gpt2_and_others_are_left_to_the_converter(exports):
    ours = json.loads((exports["qk"] / "tokenizer.json").read_text())
    assert gguf.gpt2_split(ours)
    metaspace = {**ours, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    no_regex = {**ours, "pre_tokenizer": {**ours["pre_tokenizer"], "use_regex": False}}
    unigram = {**ours, "model": {"type": "Unigram"}}
    assert not any(gguf.gpt2_split(t) for t in (metaspace, no_regex, unigram))


@pytest.mark.parametrize("name", ["qkv", "row"])
def test_a_remote_code_export_is_refused_in_one_line(exports, tmp_path, capsys, name):
    out = tmp_path / "x.gguf"
    assert run_main(gguf.main, ["--model", str(exports[name]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama.cpp has no architecture for" in err and f"precondition={name}" in err
    assert not out.exists()


@pytest.mark.slow
def test_the_qk_export_converts_to_a_gguf_with_its_tensors(exports, tmp_path, capsys):
    """f32 GGUF of the qk export: architecture qwen3, pre-tokenizer gpt-2, the export's
    vocabulary, and the token embedding equal to the export's (llama.cpp's reader: gguf-py)."""
    from safetensors.numpy import load_file

    out = tmp_path / "model.gguf"
    args = ["--model", str(exports["qk"]), "--out", str(out), "--cache-dir", str(ROOT / ".cache")]
    assert run_main(gguf.main, args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "precondition qk" in printed
    sys.path.insert(0, str(ROOT / ".cache" / f"llama.cpp-{gguf.LLAMA_CPP_PYTHON}" / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(out))

    def field(key: str):
        return reader.fields[key].contents()

    assert field("general.architecture") == "qwen3" and field("tokenizer.ggml.pre") == "gpt-2"
    vocab = json.loads((exports["qk"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(field("tokenizer.ggml.tokens")) >= len(vocab)
    tensors = {t.name: t for t in reader.tensors}
    embed = load_file(str(exports["qk"] / "model.safetensors"))["model.embed_tokens.weight"]
    got = np.asarray(tensors["token_embd.weight"].data).reshape(embed.shape)
    np.testing.assert_array_equal(got, embed.astype(np.float32))
    if "llama.cpp vs transformers" in printed:  # llama-cpp-python installed: its logits were compared
        gap = float(printed.split("largest logit difference ")[1].split()[0])
        assert gap < 1e-2, printed
