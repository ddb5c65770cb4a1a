"""The conditioning probe: condition numbers against matrices of known kappa, the probed
matrices and their kappas against a float64 numpy reference, hooks that leave the model alone,
and loading runs and HF exports."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import convert
from kernels import PRECONDITIONERS
from model import ModelConfig, Transformer, probe
from model.probe import PROBED
from research import conditioning as cond
from tests.reference import attention_reference, rms_normalize

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_probe_module_imports_no_transformers():
    names = "sorted(m for m in sys.modules if m.startswith(('transformers', 'export')))"
    code = f"import sys, model.probe; print({names})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# ---- condition numbers --------------------------------------------------------------------
def test_known_condition_numbers():
    assert probe.condition_numbers(torch.diag(torch.tensor([1.0, 10.0]))).item() == pytest.approx(10.0, rel=1e-12)
    assert probe.condition_numbers(torch.eye(5)).item() == pytest.approx(1.0, rel=1e-12)
    singular = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    assert math.isinf(probe.condition_numbers(singular).item())
    assert math.isinf(probe.condition_numbers(torch.zeros(3, 3)).item())
    # just above numpy's rank tolerance: finite (and huge); just below: singular
    tol = 2 * np.finfo(np.float64).eps
    assert probe.condition_numbers(torch.diag(torch.tensor([1.0, 4 * tol], dtype=torch.float64))).item() == (
        pytest.approx(1 / (4 * tol))
    )
    assert math.isinf(probe.condition_numbers(torch.diag(torch.tensor([1.0, tol / 2], dtype=torch.float64))).item())


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
def test_condition_numbers_of_chosen_singular_values(shape):
    """U diag(s) V^T with orthonormal U, V has kappa = s_max / s_min exactly; a float64 SVD finds
    it to about kappa * 1e-16 (a float32 one would miss kappa = 1e7 by percent)."""
    rng = np.random.default_rng(1)
    kappas = np.array([1.0, 3.0, 1e3, 1e7])
    r = min(shape)
    orthonormal = lambda n: np.linalg.qr(rng.standard_normal((n, r)))[0]
    mats = [
        orthonormal(shape[0]) @ np.diag(0.37 * np.geomspace(kap, 1.0, r)) @ orthonormal(shape[1]).T for kap in kappas
    ]
    np.testing.assert_allclose(probe.condition_numbers(torch.from_numpy(np.stack(mats))).numpy(), kappas, rtol=1e-8)


@pytest.mark.parametrize("shape", [(6, 6), (20, 5), (5, 20)])
def test_condition_numbers_match_numpy(shape):
    rng = np.random.default_rng(0)
    mats = rng.standard_normal((7, *shape)) * rng.uniform(0.01, 100, size=(7, 1, shape[1]))
    got = probe.condition_numbers(torch.from_numpy(mats)).numpy()
    np.testing.assert_allclose(got, np.linalg.cond(mats), rtol=1e-9)
    rank_deficient = mats[0][:, :1] @ rng.standard_normal((1, shape[1]))  # rank 1
    assert np.linalg.matrix_rank(rank_deficient) < min(shape)
    assert math.isinf(probe.condition_numbers(torch.from_numpy(rank_deficient)).item())


# ---- the probed matrices ------------------------------------------------------------------
def _np_softmax_causal(q, k):
    T, E = q.shape
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), q @ k.T / np.sqrt(E), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def np_matrices(q, k, v, precondition: str, eps: float) -> dict[str, np.ndarray]:
    """The probed matrices in float64 numpy, from tests.reference: name -> (B, H or K, rows, cols)."""
    q, k, v = (t.double().cpu().numpy() for t in (q, k, v))
    qn, kn = (rms_normalize(q, eps), rms_normalize(k, eps)) if precondition in ("qk", "qkv") else (q, k)
    g = q.shape[1] // k.shape[1]
    probs = lambda a, b: np.stack(
        [[_np_softmax_causal(a[i, h], b[i, h // g]) for h in range(a.shape[1])] for i in range(len(a))]
    )
    o, o_plain = attention_reference(q, k, v, precondition, eps=eps), attention_reference(q, k, v, "none")
    return dict(O=o, O_plain=o_plain, Q=qn, Q_plain=q, K=kn, K_plain=k, A=probs(qn, kn), A_plain=probs(q, k))


def np_max_logit(q, k) -> float:
    """The largest causal logit q . k / sqrt(E) of every (sequence, head), numpy float64."""
    B, H, T, E = q.shape
    g = H // k.shape[1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    return max((q[b, h] @ k[b, h // g].T / np.sqrt(E))[causal].max() for b in range(B) for h in range(H))


def np_tags(store: dict, precondition: str, eps: float) -> dict[str, float]:
    """The in-training probe's tags from captured (q, k, v, o): numpy kappas, median over the
    batch, then over heads; the largest attention logit of each layer."""
    tags = {}
    for i in sorted(store):
        mats = np_matrices(*store[i][:3], precondition, eps)
        for name, m in mats.items():
            tags[f"cond/layer{i}/{name}"] = float(np.median(np.median(np.linalg.cond(m), axis=0)))
        tags[f"logit/layer{i}/max"] = float(np_max_logit(mats["Q"], mats["K"]))
    return tags


@pytest.mark.parametrize("precondition", sorted(PRECONDITIONERS))
def test_attention_matrices_match_numpy_reference(precondition):
    B, H, K, T, E = 3, 4, 2, 9, 8  # an odd batch: its median is not its mean
    eps = 1e-2  # rows of rms ~0.1: eps moves every normalised row by percent
    q, k, v = 0.1 * torch.randn(B, H, T, E), 0.1 * torch.randn(B, K, T, E), 0.1 * torch.randn(B, K, T, E)
    mats = probe.attention_matrices(q, k, v, precondition, eps)
    ref = np_matrices(q, k, v, precondition, eps)
    for name in PROBED:
        np.testing.assert_allclose(mats[name].numpy(), ref[name], rtol=1e-10, atol=1e-13, err_msg=name)
    kap = probe.head_kappas(q, k, v, precondition, eps)
    assert kap["O"].shape == (H,) and kap["K"].shape == (K,) and kap["A"].shape == (H,)
    for name in PROBED:
        np.testing.assert_allclose(kap[name], np.median(np.linalg.cond(ref[name]), axis=0), rtol=1e-8, err_msg=name)


# ---- hooks on a model ---------------------------------------------------------------------
@pytest.mark.parametrize("precondition", sorted(PRECONDITIONERS))
def test_probe_leaves_the_model_unchanged(precondition):
    model = Transformer(tiny_cfg(precondition=precondition)).train()
    x = torch.randint(0, 64, (3, 20))
    before = model(x, x).loss
    state = {k: v.clone() for k, v in model.state_dict().items()}
    store = probe.capture_forward(model, x)
    # the recomputed O is the model's own output, so O and O_plain differ by the preconditioner only
    for q, k, v, o in store.values():
        torch.testing.assert_close(probe.attention_matrices(q, k, v, precondition, 1e-6)["O"].float(), o)
    tags = probe.probe_during_training(model, x, tiny_cfg(precondition=precondition))
    assert tags == pytest.approx(np_tags(store, precondition, 1e-6), rel=1e-8)
    logits = {f"logit/layer{i}/max" for i in range(2)}
    assert set(tags) == {f"cond/layer{i}/{n}" for i in range(2) for n in PROBED} | logits
    assert model.training and not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(x, x).loss, before)


def test_probe_under_bf16_autocast():
    """Captured bf16 q, k, v are measured in float64: the tags are numpy's on the same tensors."""
    cfg = tiny_cfg(precondition="qkv")
    model = Transformer(cfg)
    x = torch.randint(0, 64, (3, 16))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    store = probe.capture_forward(model, x, autocast)
    assert {t.dtype for t in store[0]} == {torch.bfloat16}
    tags = probe.probe_during_training(model, x, cfg, autocast)
    assert tags == pytest.approx(np_tags(store, "qkv", 1e-6), rel=1e-8) and len(tags) == 16 + 2


def test_report_writes_inf_as_a_string(tmp_path):
    layers = [{n: np.array([2.0, math.inf, math.inf]) for n in PROBED}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cond.report(layers, {"model": "x"})))
    raw = json.loads(path.read_text())
    assert raw["layers"][0]["heads"]["O"] == [2.0, "inf", "inf"] and raw["layers"][0]["median_over_heads"]["O"] == "inf"
    assert math.isinf(cond.read_json(path)["layers"][0]["median_over_heads"]["A"])
    assert "inf" in cond.table(layers)


# ---- loading: run directories and HF exports ----------------------------------------------
def _fake_run_dir(tmp_path: Path, model: Transformer, seed: int) -> Path:
    """A run dir as launcher.train leaves it at ZeRO-0 fp32: config.yaml, checkpoints/latest."""
    from data.config import DataConfig
    from run.config import RunConfig, TrainConfig, save_run_config

    run = tmp_path / "run"
    (run / "checkpoints" / "global_step5").mkdir(parents=True)
    cfg = RunConfig(model=model.cfg, data=DataConfig(seq_len=16, vocab_size=300), train=TrainConfig(seed=seed))
    save_run_config(cfg, run / "config.yaml")
    (run / "checkpoints" / "latest").write_text("global_step5")
    torch.save({"module": model.state_dict()}, run / "checkpoints" / "global_step5" / "mp_rank_00_model_states.pt")
    return run


def test_load_run_dir_and_untrained(tmp_path):
    torch.manual_seed(3)
    model = Transformer(tiny_cfg(vocab_size=300, max_seq_len=32))
    run = _fake_run_dir(tmp_path, model, seed=7)
    loaded, mcfg, meta = cond.load_model(run)
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert meta["step"] == 5 and mcfg.precondition == model.cfg.precondition
    fresh = Transformer(model.cfg)
    fresh.init_weights(7)  # what the trainer does with train.seed=7
    untrained, _, meta0 = cond.load_model(run, untrained=True)
    torch.testing.assert_close(untrained(x).logits, fresh(x).logits, rtol=0, atol=0)
    assert meta0["step"] == 0


def test_bad_model_path_is_a_one_line_error(tmp_path, capsys):
    assert cond.run_main(cond.main, ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("precondition", ["none", "qk", "qkv"])
def test_hf_export_round_trip_and_text_windows(tmp_path, precondition):
    from safetensors.torch import save_file

    from data.tokenizer import train_bpe

    torch.manual_seed(1)
    cfg = tiny_cfg(vocab_size=320, precondition=precondition, precondition_eps=1e-6)
    model = Transformer(cfg)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(convert.hf_state_dict(model.state_dict(), cfg, torch.float32), str(hf / "model.safetensors"))
    convert.hf_config(cfg, dict(bos_token_id=0, eos_token_id=0, pad_token_id=0), torch.float32).save_pretrained(hf)
    loaded, mcfg, _ = cond.load_model(hf)
    assert mcfg.precondition == precondition
    x = torch.randint(0, 320, (2, 20))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    text = " ".join(["the king and the queen of the sea"] * 200)
    train_bpe([text], vocab_size=300).save(str(hf / "tokenizer.json"))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "c.json"
    argv = ["--model", str(hf), "--text", str(tmp_path / "t.txt"), "--seq-len", "16", "--batch", "3"]
    argv += ["--json", str(out)]
    assert cond.main(argv) == 0
    doc = cond.read_json(out)
    assert doc["batch"] == 3 and doc["seq_len"] == 16 and len(doc["layers"]) == 2
    assert len(doc["layers"][0]["heads"]["K"]) == 2 and len(doc["layers"][0]["heads"]["A"]) == 4


# ---- the in-training probe ----------------------------------------------------------------
@pytest.mark.slow
def test_in_training_probe_does_not_change_training(tmp_path):
    from research.experiment import logged_conditioning, read_rows
    from tests.train_helpers import check, run_single, tiny_overrides, train_losses, write_corpus

    glob = write_corpus(tmp_path / "corpus")
    losses = {}
    for interval in (0, 2):
        run = tmp_path / f"run{interval}"
        check(run_single(tiny_overrides(glob, tmp_path / "cache", run, **{"log.conditioning_interval": interval})))
        losses[interval] = train_losses(run)
        logged = logged_conditioning(read_rows(run))
        assert bool(logged) == (interval > 0), sorted(logged)[:4]
    assert losses[0] == losses[2] and len(losses[0]) == 8
    assert {"cond/layer0/O", "cond/layer1/A_plain", "logit/layer1/max"} <= set(logged)
    assert [step for step, _ in logged["cond/layer0/O"]] == [2, 4, 6, 8]
