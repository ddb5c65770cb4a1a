import math

import pytest
import torch

from kernels import PRECONDITIONERS
from model import ModelConfig, Transformer, count_parameters, flops_per_token


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("precondition", sorted(PRECONDITIONERS))
def test_overfits_one_batch(precondition):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(precondition=precondition))
    x = torch.randint(0, 64, (4, 17))
    inputs, labels = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(inputs, labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # ~ln(64) = 4.16 at init
    assert loss.item() < 0.3 * first, (first, loss.item())


def test_forward_shapes_and_loss_definition():
    model = Transformer(tiny_cfg())
    x = torch.randint(0, 64, (2, 9))
    out = model(x)
    assert out.logits.shape == (2, 9, 64) and out.loss is None
    labels = x.clone()
    labels[:, :3] = -100
    loss = model(x, labels).loss
    manual = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, 64), x[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_model_is_causal():
    model = Transformer(tiny_cfg())
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 64
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_backends_agree_inside_the_model():
    torch.manual_seed(1)
    m1 = Transformer(tiny_cfg(attn_backend="eager"))
    m2 = Transformer(tiny_cfg(attn_backend="sdpa"))
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(m1(x).logits, m2(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_and_flops(tie):
    cfg = tiny_cfg(tie_embeddings=tie)
    model = Transformer(cfg)
    d, f, v, L, E = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers, cfg.head_dim
    per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * E + cfg.n_heads * E * d + 3 * d * f + 2 * d
    expected = L * per_layer + d + v * d * (1 if tie else 2)
    assert count_parameters(model) == expected
    matmul = L * (per_layer - 2 * d) + d * v
    assert flops_per_token(cfg, 32) == 6 * matmul + 12 * L * d * 32


def test_residual_projections_have_scaled_init():
    cfg = tiny_cfg(n_layers=8, d_model=128, ffn_hidden=256)
    model = Transformer(cfg)
    attn = model.layers[0].self_attn
    # std 0.02, and 0.02 / sqrt(2 * n_layers) on the projections into the residual stream; the
    # sample std of n normal draws has a standard error of std / sqrt(2n): 5 of those tell
    # 0.02 / sqrt(16) = 0.0050 from, say, 0.02 / sqrt(18) = 0.0047.
    for weight, std in ((attn.qkv_proj.weight, 0.02), (attn.o_proj.weight, 0.02 / 4)):
        assert abs(weight.std().item() - std) < 5 * std / math.sqrt(2 * weight.numel()), (weight.shape, std)


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(tiny_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    """fp32, 3 AdamW steps of two copies of one model: with the blocks recomputed in backward
    (each block's forward then runs twice per step) the losses and every gradient are the same."""
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg(precondition="qkv"))
    recomputed = Transformer(tiny_cfg(precondition="qkv"))
    recomputed.load_state_dict(plain.state_dict())
    recomputed.activation_checkpointing = True
    calls = []
    recomputed.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, recomputed)]
    x = torch.randint(0, 64, (3, 4, 17))
    for step in range(3):
        losses = []
        for model, opt in zip((plain, recomputed), opts, strict=True):
            opt.zero_grad()
            loss = model(x[step, :, :-1], x[step, :, 1:]).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
        assert losses[0] == losses[1], step
        for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-7, msg=name)
    assert len(calls) == 2 * 3  # the checkpointed block ran again in every backward
    with torch.no_grad():
        recomputed(x[0, :, :-1])
    assert len(calls) == 7  # no recomputation without gradients
