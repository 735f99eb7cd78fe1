"""A short CPU profile of a running process with py-spy, summarised for the benchmark report.

py-spy samples the process from outside (``--nonblocking``: it is never paused), so the profile
can run during a measured level without changing the code under test. Only stacks holding the
GIL are kept (``--gil``): a thread waiting in the event loop's poll is not CPU time. The summary
groups the samples by the package of the innermost frame (where the CPU was) and lists the
functions seen most often on top of the stack.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

#: (area, path prefixes): py-spy names a frame's file relative to its sys.path entry
#: (``ray/serve/_private/replica.py``, ``callray/session.py``); the first matching area counts.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("callray (this project)", ("callray/", "actors/", "serve_app.py", "harness/")),
    ("Ray Serve (ASGI relay, router, replica)", ("ray/serve/",)),
    ("Ray core (actor calls, object refs, metrics)", ("ray/",)),
    ("pydantic", ("pydantic",)),
    ("Starlette, FastAPI, uvicorn", ("starlette/", "fastapi/", "uvicorn/")),
    ("HTTP client (openai, httpx, aiohttp)", ("openai/", "httpx", "aiohttp/", "h11/", "yarl/", "multidict/")),
    ("WebSocket framing", ("websockets/", "wsproto/")),
    ("asyncio event loop", ("asyncio/",)),
    ("json", ("json/",)),
)


def py_spy() -> str | None:
    """The py-spy binary beside this interpreter (its venv) or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, duration_s: float, out: Path, rate: int = 100) -> subprocess.Popen:
    """Start sampling ``pid`` for ``duration_s`` into ``out`` (collapsed stacks); wait on the result."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(int(duration_s)),
                             "--rate", str(rate), "--nonblocking", "--gil", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def during(pid: int, duration_s: float, out: Path, run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Sample ``pid`` while ``run()`` runs (for ``duration_s``): run's result and the summary."""
    sampler = start(pid, duration_s, out)
    result = run()
    _, err = sampler.communicate(timeout=duration_s + 60)
    if sampler.returncode:
        raise RuntimeError(f"py-spy exited {sampler.returncode}: {err.decode(errors='replace')[-300:]}")
    return result, summarise(out)


def _area(frame: str) -> str:
    path = frame.rsplit(" (", 1)[-1]
    for area, prefixes in AREAS:
        if path.startswith(prefixes):
            return area
    return "other"


def summarise(collapsed: Path, top: int = 12) -> dict[str, Any]:
    """Samples per area of the innermost frame, and the most frequent innermost functions."""
    areas: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        leaf = stack.rsplit(";", 1)[-1]
        total += n
        areas[_area(leaf)] += n
        functions[leaf.split(" (", 1)[0] + " (" + _short(leaf) + ")"] += n
    if not total:
        return {"samples": 0, "areas": {}, "top_self": []}
    return {
        "samples": total,
        "areas": {a: round(n / total, 4) for a, n in areas.most_common()},
        "top_self": [(f, round(n / total, 4)) for f, n in functions.most_common(top)],
    }


def _short(frame: str) -> str:
    """``file.py:line`` of a py-spy frame ``function (path/to/file.py:line)``, with its package dir."""
    location = frame.rsplit(" (", 1)[-1].rstrip(")")
    parts = location.split("/")
    return "/".join(parts[-2:])
