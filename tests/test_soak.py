"""The 2-minute soak in CI: 50 calls talking for two minutes on the distributed config, with
no protocol violation and no dropped call. It runs ``harness/soak.py`` in a subprocess (its own
Ray, Redis and ports), so it never joins the session's cluster; growth and drift are reported
by the script, not asserted (timings on a shared machine are not test material)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from callray.settings import PROJECT_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_minute_soak_has_no_errors(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.Popen([sys.executable, "-m", "harness.soak", "--minutes", "2",
                             "--calls", "50", "--sample-s", "20", "--out", str(out)],
                            cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops its own Ray and Redis on SIGTERM
        output, _ = proc.communicate(timeout=60)
        pytest.fail("soak did not finish in 8 minutes:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["errors"]["total"] == 0
    assert summary["turns_answered"] > 50
