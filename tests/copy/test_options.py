"""CopyOptions: frozen, keyword-only, typed; bad values are refused when it is built."""

from __future__ import annotations

import attrs
import pytest

from sendense_nbd.copy import CopyOptions, OverlayZeroes, TargetMode


def test_defaults() -> None:
    options = CopyOptions()
    assert (options.connections, options.requests, options.retries) == (4, 16, 5)
    assert options.target_mode is TargetMode.AUTO and options.overlay_zeroes is OverlayZeroes.WRITE_ZEROES
    assert options.flush and not options.verify


@pytest.mark.parametrize(
    "field, value",
    [("connections", 0), ("requests", 0), ("request_size", 0), ("retries", -1), ("merge_gap", -1),
     ("checkpoint_bytes", -1)],
)  # fmt: skip
def test_out_of_range_values_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        CopyOptions(**{field: value})  # type: ignore[arg-type]


def test_strings_are_not_enums() -> None:
    with pytest.raises(TypeError, match="target_mode"):
        CopyOptions(target_mode="raw")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="overlay_zeroes"):
        CopyOptions(overlay_zeroes="buffers")  # type: ignore[arg-type]
    assert CopyOptions(overlay_zeroes=OverlayZeroes("buffers")).overlay_zeroes is OverlayZeroes.BUFFERS


def test_frozen_and_keyword_only() -> None:
    options = CopyOptions(verify=True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.verify = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        CopyOptions(4)  # type: ignore[call-arg]
    assert attrs.evolve(options, retries=0) == CopyOptions(verify=True, retries=0)
