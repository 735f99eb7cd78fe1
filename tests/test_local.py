"""The private helper processes tests, benchmarks and chaos runs start."""

import threading
import time
from pathlib import Path

from callray.sim.local import RedisServer, free_port


def test_a_redis_restarted_from_a_worker_thread_outlives_that_thread(tmp_path: Path) -> None:
    """Chaos restarts Redis from an asyncio worker thread; the restarted server must keep
    running after that thread ends (it did not: the rest of a test session lost its Redis)."""
    server = RedisServer(tmp_path, appendonly=False)
    server.start()
    try:
        worker = threading.Thread(target=server.restart)
        worker.start()
        worker.join()
        time.sleep(0.5)  # a death signal, had the thread's end sent one, arrives within this
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()


def test_free_port_never_hands_one_port_to_two_callers() -> None:
    """A CI run failed when the port picked for HAProxy's metrics (bound only once Serve
    started) was picked again for the run's Redis: Linux offers a just-released port again."""
    ports = [free_port() for _ in range(1024)]
    assert len(set(ports)) == len(ports)
