"""One overall bar for a run: cells done / total above the per-cell and per-training bars."""

import contextlib

from reidbench import progress
from reidbench.progress import progress_bar, run_progress


def test_bars_opened_inside_a_run_join_its_display_and_leave_it_when_they_close():
    with run_progress(3, "all cells") as advance:
        display = progress._RUN_DISPLAY
        with progress_bar() as bar:
            task = bar.add_task("a cell", total=10)
            bar.update(task, advance=10)
            with progress_bar(enabled=False) as hidden:  # a disabled bar adds an invisible task
                features = hidden.add_task("features", total=1)
                assert not next(t for t in display.tasks if t.id == features).visible
            assert len(display.tasks) == 2
        assert [t.description for t in display.tasks] == ["all cells"]
        advance()
        advance(2)
        assert display.tasks[0].completed == 3 and display.tasks[0].finished
        with run_progress(5) as inner:  # a nested run leaves the outer bar alone
            inner()
        assert progress._RUN_DISPLAY is display and display.tasks[0].total == 3
    assert progress._RUN_DISPLAY is None


def test_a_run_counts_every_cell_of_its_grid_once(tiny_zoo_file, tiny_model, tmp_path, monkeypatch):
    from reidbench import runner as runner_module
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    seen = {}

    @contextlib.contextmanager
    def recording(total, description="cells", enabled=True):
        seen["total"], seen["done"] = total, 0
        yield lambda n=1: seen.__setitem__("done", seen["done"] + n)

    monkeypatch.setattr(runner_module, "run_progress", recording)
    zoo = load_zoo(tiny_zoo_file)
    runner = Runner(zoo, results_root=tmp_path / "results", device="cpu", train_missing=False, rerank=False,
                    progress=False)
    paths = runner.run([zoo["tiny-none"]], ["m-fgsm"], eps_values=[4 / 255, 5 / 255])
    assert seen == {"total": 2, "done": 2} and len(paths) == 2


def test_a_bar_writes_lines_where_stderr_is_not_a_terminal(monkeypatch, capsys):
    # Under pytest stderr is captured, not a terminal: the case of a log file, CI or nohup.
    monkeypatch.delenv("REIDBENCH_QUIET", raising=False)
    monkeypatch.setattr(progress._LineProgress, "interval_s", 0.0)
    with progress_bar() as bar:
        task = bar.add_task("m: m-ifgsm", total=40)
        for _ in range(40):
            bar.update(task, advance=1)
        silent = bar.add_task("train m", total=4, lines=False)
        bar.update(silent, advance=4)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines[:9]] == [f"m: m-ifgsm: {4 * i}/40 ({10 * i}%)" for i in range(1, 10)]
    assert lines[9].startswith("m: m-ifgsm: 40/40 done in 0:00:0") and len(lines) == 10

    monkeypatch.setattr(progress._LineProgress, "interval_s", 3600.0)  # at most one line an hour: only the end
    with run_progress(2, "all cells") as advance:
        with progress_bar() as bar:
            bar.update(bar.add_task("a cell", total=10), advance=10)
        with progress_bar(enabled=False) as hidden:
            hidden.update(hidden.add_task("hidden", total=1), advance=1)
        advance(2)
    assert [line.split(" done")[0] for line in capsys.readouterr().err.splitlines()] == ["a cell: 10/10", "all cells: 2/2"]

    monkeypatch.setenv("REIDBENCH_QUIET", "1")
    with progress_bar() as bar:
        bar.update(bar.add_task("quiet", total=1), advance=1)
    assert capsys.readouterr().err == ""
