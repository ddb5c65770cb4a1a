"""The model-state estimate the run summary prints: what each ZeRO stage splits over the ranks."""

import pytest

from launcher.memory import describe, model_state_bytes


@pytest.mark.parametrize(
    ("stage", "bf16_bytes", "fp32_bytes"),
    [
        (0, 4 + 4 + 8, 4 + 4 + 8),  # nothing split; bf16 trains under autocast over fp32 weights and AdamW
        (1, 2 + 4 + 12 / 4, 4 + 4 + 12 / 4),  # optimizer state split (+ fp32 gradients / an fp32 weight copy)
        (2, 2 + (4 + 12) / 4, 4 + (4 + 12) / 4),  # gradients too
        (3, (2 + 4 + 12) / 4, (4 + 4 + 12) / 4),  # everything
    ],
)
def test_each_stage_splits_its_share_over_the_ranks(stage, bf16_bytes, fp32_bytes):
    assert model_state_bytes(1000, stage, 4, "bf16") == pytest.approx(1000 * bf16_bytes)
    assert model_state_bytes(1000, stage, 4, "fp32") == pytest.approx(1000 * fp32_bytes)


def test_summary_line_names_the_split():
    line = describe(348_700_000, 3, 2, "bf16")
    assert line.startswith("2.92 GiB per rank (estimate: 2 + 4 + 12 bytes/param")
    assert "ZeRO-3 splits everything over 2 ranks" in line
    assert describe(60_000, 0, 1, "fp32").startswith("0.9 MiB per rank")
