"""StatePrecision: the option's checks, its record, and the bytes it says each parameter costs."""

from __future__ import annotations

import pytest

from lightning_diffusionblocks.precision import StatePrecision


def test_default_is_full_precision() -> None:
    assert StatePrecision().full
    assert not StatePrecision(weights="bf16").full
    assert not StatePrecision(moments="8bit").full


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": "fp16"}, "weights=.*'fp32' or 'bf16'"),
        ({"moments": "4bit"}, "moments=.*'8bit'"),
        ({"rounding": "up"}, "rounding=.*'stochastic'"),
        ({"min_8bit_size": -1}, "min_8bit_size"),
        ({"min_8bit_size": True}, "min_8bit_size"),
    ],
)
def test_bad_values_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StatePrecision(**kwargs)


def test_record_round_trips_and_unknown_fields_are_refused() -> None:
    option = StatePrecision(weights="bf16", moments="8bit", rounding="stochastic", min_8bit_size=0)
    assert StatePrecision.of(option.record()) == option
    assert StatePrecision.of(option) is option
    assert StatePrecision.of(None) == StatePrecision()
    with pytest.raises(ValueError, match="Unknown StatePrecision fields"):
        StatePrecision.of({"weight": "bf16"})
    with pytest.raises(TypeError, match="state_precision must be"):
        StatePrecision.of("bf16")  # type: ignore[arg-type]


def test_weight_bytes() -> None:
    n = 1000
    assert StatePrecision().weight_bytes(n, active=False) == 4 * n
    assert StatePrecision(weights="bf16").weight_bytes(n, active=False) == 2 * n
    assert StatePrecision(weights="bf16").weight_bytes(n, active=True) == 4 * n  # the active group's fp32 master


def test_moment_bytes() -> None:
    n = 10_000  # 40 blocks of 256 (the last one partial)
    assert StatePrecision().moment_bytes(n, active=True) == 8 * n
    assert StatePrecision(moments="bf16").moment_bytes(n, active=False) == 4 * n
    assert StatePrecision(moments="bf16").moment_bytes(n, active=True) == 8 * n
    # two uint8 moments, one fp32 scale per 256-value block each, and a 256-entry fp32 map each
    eight = 2 * n + 2 * 4 * 40 + 2 * 4 * 256
    assert StatePrecision(moments="8bit").moment_bytes(n, active=True) == eight
    assert StatePrecision(moments="8bit").moment_bytes(n, active=False) == eight
    assert StatePrecision(moments="8bit", min_8bit_size=n + 1).moment_bytes(n, active=False) == 8 * n
