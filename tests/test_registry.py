"""A preconditioner registered in one place (kernels/precondition.py) trains on every backend that
can run it, exports or is refused with one line naming it, and is probed."""

from __future__ import annotations

import shutil

import pytest
import torch

from core.errors import ConfigError
from kernels import PRECONDITIONERS, Preconditioner, attention, register
from model import ModelConfig, Transformer
from tests.reference import attention_reference64, output_and_grads

NEW = "qkvo"
"""Declared by rows: every row of q, k, v and o scaled, a combination no built-in has."""
CUSTOM = "omax"
"""A custom diagonal preconditioner (o_i / max|o_i|): only the unfused backends can run it."""


@pytest.fixture
def registered():
    names = [
        register(Preconditioner(NEW, rows="qkvo", doc="C_Q Q, C_K K, C_V V, then C O")).name,
        register(Preconditioner(CUSTOM, epilogue=lambda o, eps: o / (o.abs().amax(-1, keepdim=True) + eps))).name,
    ]
    yield
    for name in names:
        PRECONDITIONERS.pop(name)


def tiny_cfg(precondition: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
        precondition=precondition, precondition_eps=1e-6,
    )  # fmt: skip


def train(model: Transformer, steps: int = 12) -> list[float]:
    """AdamW steps on one batch of random tokens; returns the losses; checks every gradient flows."""
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_builtins_are_the_design_table():
    assert {n: PRECONDITIONERS[n].rows for n in ("none", "qk", "qkv", "row")} == {
        "none": "",
        "qk": "qk",
        "qkv": "qkv",
        "row": "o",
    }


@pytest.mark.parametrize("name", [NEW, CUSTOM])
def test_a_registered_preconditioner_trains(registered, name):
    torch.manual_seed(0)
    losses = train(Transformer(tiny_cfg(name)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_fused_kernel_fuses_rows_and_refuses_a_custom_one_in_one_line(registered):
    triton_attention = pytest.importorskip("kernels.triton_attention")
    if not (triton_attention.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 before import")
    device = "cpu" if triton_attention.INTERPRET else "cuda"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 19, 16, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    do = torch.randn(1, 2, 19, 16, generator=g, dtype=torch.float64)
    want = output_and_grads(lambda q, k, v: attention_reference64(q, k, v, NEW), q, k, v, do)
    q, k, v, do = (t.float().to(device) for t in (q, k, v, do))
    for backend in ("eager", "triton"):
        got = output_and_grads(lambda q, k, v, b=backend: attention(q, k, v, precondition=NEW, backend=b), q, k, v, do)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            # fp32 against float64, each entry within 1e-5 of the largest (the bound and its
            # reasoning as FP32_TOL in test_triton_attention.py); a missing row scale is off by O(1).
            msg = f"{backend} {name}"
            tol = 1e-5 * float(b.abs().max())
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=tol, msg=lambda m, n=msg: f"{n}: {m}")
    with pytest.raises(ValueError, match=f"precondition='{CUSTOM}'.*fused Triton kernel does not implement") as e:
        attention(q, k, v, precondition=CUSTOM, backend="triton")
    assert "\n" not in str(e.value)


def test_export_reloads_with_matching_logits_and_is_probed(registered, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from export import convert
    from model.probe import probe

    torch.manual_seed(0)
    cfg = tiny_cfg(NEW)
    model = Transformer(cfg)
    train(model, steps=3)
    save_file(convert.hf_state_dict(model.state_dict(), cfg, torch.float32), str(tmp_path / "model.safetensors"))
    convert.hf_config(cfg, dict(bos_token_id=0, eos_token_id=0, pad_token_id=0), torch.float32).save_pretrained(
        tmp_path
    )
    assert convert.needs_remote_code(NEW)
    shutil.copyfile(convert.MODELING_FILE, tmp_path / convert.MODELING_FILE.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=1e-5, atol=1e-5)
    layers = probe(model, x, cfg)
    assert len(layers) == 2 and all((layer["O"] != layer["O_plain"]).all() for layer in layers)


def test_export_refuses_a_custom_preconditioner_in_one_line(registered):
    from export import convert

    for export in (convert.needs_remote_code, lambda p: convert.hf_config(tiny_cfg(p), {}, torch.float32)):
        with pytest.raises(ConfigError, match=f"precondition='{CUSTOM}' cannot be exported") as e:
            export(CUSTOM)
        assert "\n" not in str(e.value)
