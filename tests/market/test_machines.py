"""Availability windows and hour-of-week arithmetic, checked against the contract's rule."""

import calendar

import pytest

from deepmarket.errors import ConfigError
from deepmarket.market.machines import ALWAYS, hour_of_week, is_available, parse_windows


def unix(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0))


def test_hour_of_week_starts_monday_midnight_utc():
    assert hour_of_week(unix(2026, 11, 30, 0)) == 0  # a Monday
    assert hour_of_week(unix(2026, 11, 30, 23, 59)) == 23
    assert hour_of_week(unix(2026, 12, 4, 20)) == 4 * 24 + 20  # Friday 20:00
    assert hour_of_week(unix(2026, 12, 6, 23, 59)) == 167  # Sunday 23:59


def test_epoch_was_thursday():
    assert hour_of_week(0) == 72


def test_always_sets_all_168_bits():
    assert parse_windows("always") == ALWAYS
    assert ALWAYS.bit_length() == 168


def test_weekday_evenings():
    mask = parse_windows("mon-fri 18-24")
    assert bin(mask).count("1") == 5 * 6
    assert is_available(mask, unix(2026, 12, 4, 18))  # Friday 18:00
    assert is_available(mask, unix(2026, 12, 4, 23, 59))
    assert not is_available(mask, unix(2026, 12, 4, 17, 59))
    assert not is_available(mask, unix(2026, 12, 5, 18))  # Saturday


def test_several_ranges_combine():
    mask = parse_windows("mon 0-1, sun 23-24")
    assert mask == (1 << 0) | (1 << 167)


def test_never_is_empty():
    assert parse_windows("never") == 0


@pytest.mark.parametrize("text", ["mon", "fri-mon 0-24", "mon 18-17", "mon 0-25", "xyz 0-1", "mon a-b"])
def test_invalid_window_raises_config_error(text):
    with pytest.raises(ConfigError) as info:
        parse_windows(text)
    assert repr(text) in str(info.value)
