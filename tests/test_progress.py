"""Progress on long work when stderr is not a terminal (a study under nohup, CI logs)."""

from ivl_local.progress import step_progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_plain_line_at_most_every_interval_and_one_at_the_end(capsys):
    clock = FakeClock()
    with step_progress("evaluating", 160, every=60.0, clock=clock) as advance:
        for i in range(160):
            clock.now += 9.0          # 9 s per item: a line every 7th item, then the last
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "evaluating: 7/160 (4 %), 1 min elapsed, about 23 min left"
    assert lines[-1] == "evaluating: 160/160 (100 %), 24 min elapsed"
    assert len(lines) == 160 // 7 + 1
    assert all("left" in line for line in lines[:-1])


def test_no_line_without_a_total(capsys):
    """A caller that turned progress off passes total 0 (harness, align): nothing is written."""
    clock = FakeClock()
    with step_progress("evaluating", 0, clock=clock) as advance:
        clock.now += 600
        advance()
    assert capsys.readouterr().err == ""


def test_fields_still_reach_the_bar(capsys):
    with step_progress("aligning", 2, every=0.0, clock=FakeClock()) as advance:
        advance(description="aligning 1/2")
        advance(2 - 1)
    assert capsys.readouterr().err.splitlines()[-1].startswith("aligning: 2/2 (100 %)")


def test_a_resumed_run_leaves_the_steps_done_before_out_of_the_rate():
    from ivl_local.progress import Heartbeat

    clock, lines = FakeClock(), []
    beat = Heartbeat("training", 100, every=60.0, clock=clock, write=lines.append, start=50)
    clock.now += 600
    beat.update(60, "loss 1.2345")          # 10 steps in 10 min: 40 left take 40 min, not 8
    assert lines == ["training: 60/100 (60 %), 10 min elapsed, about 40 min left, loss 1.2345\n"]


def test_the_trainers_bar_writes_lines_off_a_terminal_and_only_when_enabled(capsys):
    from ivl_local.train.trainer import _Bar

    with _Bar(3, 0, enabled=True) as bar:
        for step in (1, 2, 3):
            bar.update(step, 0.5)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("training: 3/3 (100 %)") and last.endswith("loss 0.5000")
    with _Bar(3, 0, enabled=False) as bar:     # another rank of a distributed run: silent
        bar.update(3, 0.5)
    assert capsys.readouterr().err == ""


def test_a_zero_total_writes_nothing_and_does_not_divide_by_it():
    from ivl_local.progress import Heartbeat

    lines = []
    beat = Heartbeat("training", 0, every=0.0, clock=FakeClock(), write=lines.append)
    beat.update(1)
    assert lines == []


def test_the_final_line_is_written_once():
    from ivl_local.progress import Heartbeat

    lines = []
    beat = Heartbeat("evaluating", 2, every=0.0, clock=FakeClock(), write=lines.append)
    for done in (1, 2, 2, 3):
        beat.update(done)
    assert [line.split(",")[0] for line in lines] == ["evaluating: 1/2 (50 %)", "evaluating: 2/2 (100 %)"]
