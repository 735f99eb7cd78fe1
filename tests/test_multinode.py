"""Two Ray nodes on one machine; the second dies and its calls resume on the head.

Runs ``scripts/multinode.py --check`` in a subprocess: it is a cluster of its own (``ray
start`` head and worker), which this pytest process must not join (it may already be
connected to the session's local Ray). Whatever happens, every process of that cluster is
stopped by pid: the script does it itself; if it has to be killed, this test finishes the job.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "multinode.py"
TIMEOUT_S = 240


def kill_processes_under(base: Path) -> list[int]:
    spec = importlib.util.spec_from_file_location("callray_multinode_script", SCRIPT)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module.kill_processes_under(base)


def test_second_node_dies_and_its_calls_resume_on_the_head():
    workdir = Path(tempfile.mkdtemp(prefix="crmn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    from tests.conftest import TEST_INGRESS

    ingress = TEST_INGRESS  # the session's ingress, on a cluster of its own
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--check", "--workdir", str(workdir), "--ingress", ingress],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its cluster on SIGTERM
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"scripts/multinode.py did not finish in {TIMEOUT_S} s:\n{output[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = kill_processes_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    steps = "\n".join(line for line in output.splitlines() if line.startswith("["))  # the script's own log
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{steps or output[-6000:]}"
    assert "RESULT: PASS" in output, steps
    assert "CHECK ok   one gateway replica on each node" in steps
    assert "CHECK ok   exactly the calls that lived on node2 lost their socket" in steps
    assert "(reconnected): the agent still knows" in steps  # a dropped call resumed with its history
    assert "CHECK ok   every live replica is on the head" in steps
    assert "CHECK ok   every call lives in a replica on the head" in steps
    assert "CHECK FAIL" not in steps
    assert leftovers == [], f"the script left processes running: {leftovers}"
