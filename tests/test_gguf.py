"""The GGUF path (export/gguf.py): llama.cpp's converter, fetched from the registry's source
package, turns the qk export (a stock Qwen3) into a GGUF whose tensors are the export's and
whose pre-tokenizer is GPT-2's; the remote-code exports are refused in one line. The logits
check against transformers runs where llama-cpp-python is installed (a 9-minute build, not
part of the suite's set-up; docs/export.md has its numbers). The conversion itself fetches the
converter (77 MB) and trains the shared runs: it runs with the extra group."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from core.cli import run_main
from export import gguf
from tests.train_helpers import ROOT


def our_tokenizer_json(folder) -> dict:
    """tokenizer.json of a BPE trained the way data.prepare trains one."""
    from data.tokenizer import EOS_TOKEN, save_tokenizer, train_bpe

    path = save_tokenizer(train_bpe(["to be or not to be, that is the question"] * 20, 300), EOS_TOKEN, folder, 64)
    return json.loads(path.read_text())


def test_our_tokenizer_splits_like_gpt2_and_others_are_left_to_the_converter(tmp_path):
    ours = our_tokenizer_json(tmp_path / "tok")
    assert gguf.gpt2_split(ours)
    metaspace = {**ours, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    no_regex = {**ours, "pre_tokenizer": {**ours["pre_tokenizer"], "use_regex": False}}
    unigram = {**ours, "model": {"type": "Unigram"}}
    assert not any(gguf.gpt2_split(t) for t in (metaspace, no_regex, unigram))


@pytest.mark.parametrize("name", ["qkv", "row"])
def test_a_remote_code_export_is_refused_in_one_line(tmp_path, capsys, name):
    """What export.convert writes for qkv and row: our architecture and its auto_map."""
    from export.convert import REMOTE_ARCHITECTURE

    model = tmp_path / "hf"
    model.mkdir()
    config = {"architectures": [REMOTE_ARCHITECTURE], "auto_map": {"AutoConfig": "x.Y"}, "precondition": name}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")
    out = tmp_path / "x.gguf"
    assert run_main(gguf.main, ["--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama.cpp has no architecture for" in err and f"precondition={name}" in err
    assert not out.exists()


@pytest.mark.extra
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


@pytest.mark.extra
def test_llama_cpp_reads_the_gguf_with_transformers_logits(exports, tmp_path, capsys):
    """Where llama-cpp-python is installed, the command's own check: llama.cpp's logits of the
    f32 GGUF against transformers' in fp32."""
    missing = f"llama-cpp-python=={gguf.LLAMA_CPP_PYTHON} is not installed (docs/export.md)"
    pytest.importorskip("llama_cpp", reason=missing)
    out = tmp_path / "model.gguf"
    args = ["--model", str(exports["qk"]), "--out", str(out), "--cache-dir", str(ROOT / ".cache")]
    assert run_main(gguf.main, args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    gap = float(printed.split("llama.cpp vs transformers: largest logit difference ")[1].split()[0])
    # llama.cpp keeps its KV cache in f16 (relative rounding 2^-11): 1.45e-3 measured on the
    # 4M model (docs/export.md); a converted tensor in the wrong layout or a missing q/k norm
    # moves the logits by O(1).
    assert gap < 1e-2, printed
