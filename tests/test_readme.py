"""The README's three jobs run as written: its `bash` blocks under "Your own log", one after the
other in a fresh folder holding a shop's `shop.csv`, with `recsys` on the PATH as `make`
installs it. The broker and the server take the README's default ports (9092, 8000)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from logs import shop_log
from waiting import wait_until

README = Path(__file__).resolve().parents[1] / "README.md"


def job_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the section a new user reads to run their own log."""
    section = readme.split("## Your own log", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_the_readme_shows_the_three_jobs_as_commands():
    blocks = job_blocks(README.read_text())
    assert len(blocks) == 3
    replay, stream, serve = blocks
    assert "recsys replay --data shop.csv" in replay
    assert "recsys stream" in stream and "recsys produce" in stream
    assert "recsys serve" in serve and "curl" in serve and "X-API-Key" in serve


@pytest.mark.slow
def test_the_readmes_three_jobs_run_as_written_on_a_shops_log(tmp_path):
    shop = shop_log(tmp_path / "shop.csv", n_events=4_000, end_s=int(time.time()) - 7_200)
    assert (shop["user_id"] == "cust-45").sum() > 0  # the README's customer
    script = "set -euo pipefail\n" + "\n".join(job_blocks(README.read_text()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RECSYS_API_KEY", None)
    # One process group: the blocks' background worker and server go with it at the end.
    run = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = run.communicate(timeout=900)
        assert run.returncode == 0, out[-4000:]
        report = (tmp_path / "runs" / "replay" / "report.md").read_text()
        assert "| nested |" in report and "| hybrid |" in report
        assert (tmp_path / "runs" / "model" / "model.onnx").exists()
        assert '"user_id":"cust-45"' in out and '"accepted":{"user_id":"cust-45","item_id":"sku-7"' in out

        def served_from_state():
            answer = httpx.get("http://127.0.0.1:8000/recommendations/cust-45", params={"k": 3}, timeout=30).json()
            return answer if answer["source"] == "user" else None

        answer = wait_until(served_from_state, "cust-45 served from their own state", 180)
        assert answer["user_id"] == "cust-45" and len(answer["items"]) == 3
        assert all(item["item_id"].startswith("sku-") and "price" in item for item in answer["items"])
    finally:
        with_logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
        try:
            os.killpg(run.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        subprocess.run([str(Path(sys.executable).parent / "recsys"), "broker", "stop"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=60)
        print(with_logs)
