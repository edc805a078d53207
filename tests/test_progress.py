"""vila_m3.progress: plain lines with the time left off a terminal, tqdm's bar on one."""

from __future__ import annotations

import io

import pytest

from vila_m3.progress import duration_text, is_terminal, progress


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (44.6, "45 s"), (59.4, "59 s"), (60, "1 min"), (130, "2 min 10 s"), (599, "9 min 59 s"),
    (600, "10 min"), (14 * 60 + 20, "14 min"), (3600, "1 h"), (3900, "1 h 5 min"), (-3, "0 s"),
])
def test_durations_read_in_words(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_plain_lines_every_tenth_with_elapsed_and_time_left() -> None:
    clock, lines = FakeClock(), []
    bar = progress(600, "Training the demo's VISTA3D on synthetic phantom CTs", "steps", log=lines.append,
                   clock=clock, bar=False)
    assert lines == ["Training the demo's VISTA3D on synthetic phantom CTs: 600 steps to go"]
    for _ in range(120):
        clock.now += 0.25
        bar.update()
    # marks at 60 and 120 steps, a quarter second a step: 15 s in, 135 s left; 30 s in, 120 s left
    assert lines[1:] == [
        "Training the demo's VISTA3D on synthetic phantom CTs: 60/600 steps, 15 s elapsed, ~2 min 15 s left",
        "Training the demo's VISTA3D on synthetic phantom CTs: 120/600 steps, 30 s elapsed, ~2 min left",
    ]
    bar.set_postfix("loss 0.3121")
    for _ in range(480):
        clock.now += 0.25
        bar.update()
    bar.close()
    assert len(lines) == 11  # the start, nine marks and the end, no repeat on close
    assert lines[-2].endswith("540/600 steps, 2 min 15 s elapsed, ~15 s left, loss 0.3121")
    assert lines[-1] == ("Training the demo's VISTA3D on synthetic phantom CTs: 600/600 steps, 2 min 30 s elapsed, "
                         "done, loss 0.3121")


def test_a_slow_step_gets_a_line_every_30_seconds_between_marks() -> None:
    clock, lines = FakeClock(), []
    bar = progress(1000, "Fine-tuning the demo VLM", log=lines.append, clock=clock, bar=False)
    for _ in range(4):
        clock.now += 31.0
        bar.update()
    assert lines[1:] == [f"Fine-tuning the demo VLM: {n}/1000 steps, {duration_text(31 * n)} elapsed, "
                         f"~{duration_text(31 * (1000 - n))} left" for n in range(1, 5)]
    assert lines[-1] == "Fine-tuning the demo VLM: 4/1000 steps, 2 min 4 s elapsed, ~8 h 35 min left"


def test_wrapping_items_counts_each_after_it_is_done_and_closes_at_the_end() -> None:
    clock, stream = FakeClock(), io.StringIO()
    seen = []
    for volume in progress(["ct", "mri", "cxr"], "Reading labelled studies (data engine)", "volumes", stream=stream,
                           clock=clock):
        seen.append(volume)
        clock.now += 2.0
    assert seen == ["ct", "mri", "cxr"]
    assert stream.getvalue().splitlines() == [
        "Reading labelled studies (data engine): 3 volumes to go",
        "Reading labelled studies (data engine): 1/3 volumes, 2 s elapsed, ~4 s left",
        "Reading labelled studies (data engine): 2/3 volumes, 4 s elapsed, ~2 s left",
        "Reading labelled studies (data engine): 3/3 volumes, 6 s elapsed, done",
    ]


def test_without_a_total_it_says_the_count_and_the_elapsed_time() -> None:
    clock, lines = FakeClock(), []
    with progress(iter(range(5)), "Writing conversations (data engine)", "chats", log=lines.append, clock=clock,
                  bar=False) as bar:
        for _ in range(5):
            clock.now += 10.0
            bar.update()
    assert lines == ["Writing conversations (data engine): starting",
                     "Writing conversations (data engine): 3 chats, 30 s elapsed",
                     "Writing conversations (data engine): 5 chats, 50 s elapsed"]


def test_a_loop_left_early_still_says_how_far_it_got() -> None:
    clock, lines = FakeClock(), []
    with progress(100, "Evaluating the demo model on held-out phrasings", "records", log=lines.append, clock=clock,
                  bar=False) as bar:
        for _ in range(15):
            clock.now += 1.0
            bar.update()
    assert lines[-1] == "Evaluating the demo model on held-out phrasings: 15/100 records, 15 s elapsed, ~1 min 25 s left"
    assert len(lines) == 3  # start, the 10 % mark, and where it stopped


def test_on_a_terminal_it_draws_tqdms_bar_with_the_time_left_and_no_plain_lines() -> None:
    terminal, lines = Terminal(), []
    assert is_terminal(terminal) and not is_terminal(io.StringIO()) and not is_terminal(None)
    with progress(40, "Training the demo's BRATS on synthetic phantom brain MRIs", stream=terminal,
                  log=lines.append) as bar:
        for _ in range(40):
            bar.set_postfix("loss 0.5000")
            bar.update()
    shown = terminal.getvalue()
    assert lines == []
    assert "\r" in shown  # redrawn in place
    last = shown.rstrip("\n").split("\r")[-1]
    assert last.startswith("Training the demo's BRATS on synthetic phantom brain MRIs: 100%|")
    assert "40/40 steps [00:00 elapsed, ~00:00 left, loss 0.5000]" in last


def test_off_a_terminal_without_a_log_the_lines_go_to_the_stream() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with progress(2, "Writing the sample studies", "studies", stream=stream, clock=clock) as bar:
        clock.now += 3.0
        bar.update(2)
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines()[-1] == "Writing the sample studies: 2/2 studies, 3 s elapsed, done"


def test_disabled_it_writes_nothing_but_still_goes_through_the_items() -> None:
    terminal, lines = Terminal(), []
    assert list(progress([1, 2, 3], "Quiet", stream=terminal, log=lines.append, disable=True)) == [1, 2, 3]
    assert terminal.getvalue() == "" and lines == []


def test_counting_progress_cannot_be_iterated() -> None:
    with pytest.raises(TypeError, match="wraps no items"):
        list(progress(3, "Counting", bar=False, log=lambda line: None))
