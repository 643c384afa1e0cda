"""The CLI as a good Unix tool (issue 16 item 4): run directories and checkpoints accepted where
either makes sense, messages that name the real problem, numbers that stay numbers, one unit
convention, progress only on a terminal, quiet exits into a closed pipe.  In-process through
``main()`` unless a process boundary is under test."""

from __future__ import annotations

import io

from unbroken.cli.progress import ProgressBar, ProgressBars
from unbroken.cli.units import format_size


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sizes_are_decimal_si_everywhere() -> None:
    assert format_size(999) == "999 B"
    assert format_size(1000) == "1.0 kB"
    assert format_size(384_100_000) == "384.1 MB"
    assert format_size(402_800_000) == "402.8 MB"
    assert format_size(5 * 10**9) == "5.0 GB"
    assert format_size(10**400) == f"{10**400} B"  # more than a float holds: the bytes as they are


def test_progress_bar_draws_on_a_terminal_in_the_same_units() -> None:
    stream = _Terminal()
    with ProgressBar("step_1", total=2_000_000, stream=stream, delay=0) as bar:
        bar.update(1_000_000)
    drawn = stream.getvalue()
    assert "step_1" in drawn and "/2.00M " in drawn  # decimal: 2_000_000 B in 1024s would be 1.91M


def test_progress_bar_stays_silent_off_a_terminal_and_when_nothing_moves() -> None:
    not_a_tty = io.StringIO()
    with ProgressBar("step_1", total=10, stream=not_a_tty, delay=0) as bar:
        bar.update(10)
    assert not_a_tty.getvalue() == ""
    terminal = _Terminal()
    with ProgressBars(stream=terminal, delay=0) as bars:
        assert bars("step_1", 10) is not None  # a step already present: never advanced, never drawn
    assert terminal.getvalue() == ""
    with ProgressBars(stream=terminal, enabled=False, delay=0) as bars:
        assert bars("step_1", 10) is None


def test_progress_bar_waits_before_drawing_a_short_operation() -> None:
    stream = _Terminal()
    with ProgressBar("step_1", total=10, stream=stream, delay=3600.0) as bar:
        bar.update(10)
    assert stream.getvalue() == ""
