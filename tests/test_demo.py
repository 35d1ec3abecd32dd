"""`make demo` end to end on a small log: every part of the local stack starts, the user's
ranking reacts to their posted events, everything stops cleanly, and a report is written."""

import json
import re

import pytest

from commands.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_the_demo_runs_the_whole_stack_and_cleans_up(tmp_path, capsys):
    cfg = DemoConfig(events=20_000, out=tmp_path, replay_models=("pop_online_decay", "nested"))
    assert run_demo(cfg) == 0
    out = capsys.readouterr().out
    for step in ("[train]", "[export]", "[feast]", "[start]", "[stream] all 20,000 applied", "[stop] worker and "
                 "server stopped cleanly", "[demo] OK"):
        assert step in out, step
    assert "top 10" in out and "after posting" in out
    assert re.search(r"served top 10: \d+ → \d+ from 'cluster-\d+'", out)  # the group's share, before and after
    # Beside the served list, what the synthetic log's true distribution ranks for that session.
    assert re.search(r"the log's own generator, for this user certainly in a 'cluster-\d+' session: \d+ of its top 10",
                     out)
    assert (tmp_path / "checkpoints" / "demo.safetensors").is_file()  # the worker's last checkpoint
    report = json.loads((tmp_path / "replay" / "report.json").read_text())
    assert set(report["models"]) == {"pop_online_decay", "nested"}
    assert list((tmp_path / "replay").glob("*.png"))
