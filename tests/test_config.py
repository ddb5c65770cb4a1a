import dataclasses
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from run.config import RunConfig, load_run_config
from tests.train_helpers import ROOT

CONTRACT_KEYS = {
    "model": "vocab_size d_model n_layers n_heads n_kv_heads ffn_hidden max_seq_len rope_theta norm_eps "
    "tie_embeddings precondition precondition_eps attn_backend",
    "data": "files format text_field hf_dataset hf_subset hf_split tokenizer vocab_size seq_len cache_dir",
    "train": "max_steps seed micro_batch_size grad_accum precision lr save_interval eval_interval log_interval "
    "output_dir",
    "deepspeed": "zero_stage config",
}
CONFIGS = sorted(Path(ROOT, "configs").glob("*.yaml"))


def test_the_contract_keys_exist():
    cfg = RunConfig()
    for section, keys in CONTRACT_KEYS.items():
        names = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        assert set(keys.split()) <= names, (section, set(keys.split()) - names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_with_the_values_it_sets(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_run_config(path)
    assert len(CONFIGS) >= 5 and raw.keys() <= {"model", "data", "train", "deepspeed", "log"}
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            expected = [value] if key == "files" and isinstance(value, str) else value
            assert got == expected and type(got) is type(expected), f"{path.name}: {section}.{key}"


def test_overrides_are_typed():
    cfg = load_run_config(
        None, ["model.d_model=128", "train.lr=1e-3", "data.files=[a.txt,b.txt]", "model.tie_embeddings=false"]
    )
    assert cfg.model.d_model == 128 and cfg.train.lr == 1e-3
    assert cfg.data.files == ["a.txt", "b.txt"] and cfg.model.tie_embeddings is False
    assert load_run_config(None, ["data.files=corpus/*.txt"]).data.files == ["corpus/*.txt"]


def test_data_order_follows_the_seed_unless_data_seed_is_set():
    assert load_run_config(None, ["train.seed=3"]).train.order_seed == 3
    assert load_run_config(None, ["train.seed=3", "train.data_seed=0"]).train.order_seed == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dmodel=3", r"model.dmodel: unknown key; valid keys of model: vocab_size, d_model,"),
        ("modle.d_model=3", r"modle: unknown section; valid sections: model, data, train, deepspeed, log"),
        (
            "model.precondition=diag",
            r"model.precondition: 'diag' is not a valid choice; "
            r"choose one of none, qk, qkv, row",
        ),
        ("model.attn_backend=xla", r"choose one of auto, eager, sdpa, flash, triton"),
        ("train.precision=fp16", r"train.precision: 'fp16' is not a valid choice; choose one of auto, fp32, bf16"),
        ("train.max_steps=ten", r"train.max_steps: 'ten' is not a valid int"),
        ("train.lr=fast", r"train.lr: 'fast' is not a valid float"),
        ("train.max_steps=0", r"train.max_steps: 0 is out of range; expected a positive int"),
        ("train.data_seed=-2", r"train.data_seed: -2 is out of range; expected an int >= 0, or -1 for train.seed"),
        ("train.seed=-5", r"train.seed: -5 is out of range; expected an int >= 0"),
        ("train.lr=inf", r"train.lr: inf is out of range; expected a positive float"),
        ("train.beta1=1.5", r"train.beta1: 1.5 is out of range; expected 0 <= x < 1"),
        ("train.weight_decay=-1", r"train.weight_decay: -1.0 is out of range; expected a float >= 0"),
        ("train.grad_clip=-1", r"train.grad_clip: -1.0 is out of range"),
        ("model.rope_theta=nan", r"model.rope_theta: nan is out of range; expected a positive float"),
        ("model.init_std=-1", r"model.init_std: -1.0 is out of range; expected a float >= 0"),
        ("data.weights=abc", r"data.weights: 'abc' is not a list of numbers"),
        ("data.files=5", r"data.files: 5 is not a glob or a list of globs"),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage: 4 is not a valid choice"),
        ("model.n_kv_heads=3", r"model.n_kv_heads: 3 is out of range; expected a divisor of model.n_heads"),
        ("data.seq_len=100000", r"data.seq_len: 100000 is larger than model.max_seq_len"),
        ("train.max_steps", r"expected section.key=value"),
    ],
)
def test_bad_config_messages(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)


def test_resolved_config_round_trips(tmp_path):
    from run.config import save_run_config

    cfg = load_run_config(None, ["model.precondition=row", "train.max_steps=7"])
    save_run_config(cfg, tmp_path / "config.yaml")
    again = load_run_config(tmp_path / "config.yaml")
    assert again == cfg


def test_help_lists_every_key_with_its_field_docstring():
    from core.config import config_help, field_docs
    from run.config import SECTIONS

    text = config_help(SECTIONS)
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert f"  {section}.{f.name} [" in text and docs[f.name].split()[0] in text
    assert "AdamW's decay rate of the running mean of squared gradients." in text
