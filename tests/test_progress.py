"""Progress on long work when stderr is not a terminal (a study under nohup, CI logs)."""

from ivl_local.progress import Heartbeat, step_progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_plain_line_at_most_every_interval_and_one_at_the_end(capsys):
    clock = FakeClock()
    with step_progress("evaluating", 160, every=60.0, clock=clock) as advance:
        for _ in range(160):
            clock.now += 9.0          # 9 s per item: a line every 7th item, then the last
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "evaluating: 7/160 (4 %), 1 min elapsed, about 23 min left"   # 153 x 9 s
    assert lines[-1] == "evaluating: 160/160 (100 %), 24 min elapsed"
    assert len(lines) == 160 // 7 + 1
    assert all("left" in line for line in lines[:-1])


def test_set_up_before_the_first_step_does_not_skew_the_time_left():
    """The harness trains a value net (an hour) before a group's first answer."""
    clock, lines = FakeClock(), []
    beat = Heartbeat("evaluating", 100, every=60.0, clock=clock, write=lines.append)
    clock.now += 3600
    beat.advance()
    for _ in range(9):
        clock.now += 10
        beat.advance()
    assert lines == ["evaluating: 1/100 (1 %), 60 min elapsed\n",                     # no rate yet
                     "evaluating: 7/100 (7 %), 61 min elapsed, about 16 min left\n"]   # 93 x 10 s


def test_a_resumed_run_leaves_the_steps_done_before_out_of_the_rate():
    clock, lines = FakeClock(), []
    beat = Heartbeat("training", 100, every=60.0, clock=clock, write=lines.append, done=50)
    clock.now += 60
    beat.update(51)
    clock.now += 540
    beat.update(60, "loss 1.2345")          # 9 steps in 9 min: 40 left take 40 min, not 8
    assert lines[-1] == "training: 60/100 (60 %), 10 min elapsed, about 40 min left, loss 1.2345\n"


def test_work_that_ends_early_says_where_it_ended(capsys):
    """A skipped group never reaches the total; a closing line says so."""
    clock = FakeClock()
    with step_progress("evaluating", 10, every=60.0, clock=clock) as advance:
        clock.now += 5
        advance(4)
    assert capsys.readouterr().err.splitlines() == ["evaluating: ended at 4/10, 5 s elapsed"]


def test_no_line_without_a_total(capsys):
    """A caller that turned progress off passes total 0 (harness, align): nothing is written."""
    clock = FakeClock()
    with step_progress("evaluating", 0, clock=clock) as advance:
        clock.now += 600
        advance()
    assert capsys.readouterr().err == ""


def test_the_final_line_is_written_once():
    lines = []
    beat = Heartbeat("evaluating", 2, every=0.0, clock=FakeClock(), write=lines.append)
    for done in (1, 2, 2, 3):
        beat.update(done)
    beat.close()
    assert [line.split(",")[0] for line in lines] == ["evaluating: 1/2 (50 %)", "evaluating: 2/2 (100 %)"]


def test_a_failing_stderr_turns_progress_off_and_never_stops_the_work():
    calls = []

    def broken(text):
        calls.append(text)
        raise BrokenPipeError(32, "Broken pipe")

    beat = Heartbeat("training", 10, every=0.0, clock=FakeClock(), write=broken)
    for step in range(1, 11):
        beat.update(step)
    beat.close()
    assert len(calls) == 1                 # the first failure turned it off


def test_hours_read_as_hours():
    lines = []
    clock = FakeClock()
    beat = Heartbeat("training", 2, every=0.0, clock=clock, write=lines.append)
    clock.now += 3 * 3600
    beat.update(2)
    assert lines == ["training: 2/2 (100 %), 3.0 h elapsed\n"]


def test_the_trainers_bar_writes_lines_off_a_terminal_and_only_when_enabled(capsys):
    from ivl_local.train.trainer import _Bar

    with _Bar(3, 0, enabled=True) as bar:
        for step in (1, 2, 3):
            bar.update(step, 0.5)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("training: 3/3 (100 %)") and last.endswith("loss 0.5000")
    with _Bar(10, 5, enabled=True) as bar:     # resumed at step 5, stopped at 7 (a time limit)
        bar.update(6, 0.5)
        bar.update(7, 0.5)
    assert capsys.readouterr().err.splitlines()[-1].startswith("training: ended at 7/10")
    with _Bar(3, 0, enabled=False) as bar:     # another rank of a distributed run: silent
        bar.update(3, 0.5)
    assert capsys.readouterr().err == ""
