"""The layering rule: the plain library (``callray/``) never imports Ray or the harness."""

from __future__ import annotations

import subprocess
import sys

from callray.settings import PROJECT_DIR

PROBE = """
import importlib, pkgutil, sys
import callray
for module in pkgutil.walk_packages(callray.__path__, "callray."):
    importlib.import_module(module.name)
print(sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "harness", "actors", "serve_app"))))
"""


def test_no_module_of_the_plain_library_imports_ray_or_the_harness():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"callray/ pulled in: {out.stdout.strip()}"


TRANSPORT_PROBE = """
import sys
import callray.session
print(sorted(m for m in ("callray.host", "callray.conversation", "callray.stores") if m in sys.modules))
"""


def test_the_socket_session_is_transport_alone():
    """session.py knows where a call lives only through its CallLink: no host, no conversation."""
    out = subprocess.run([sys.executable, "-c", TRANSPORT_PROBE], cwd=PROJECT_DIR, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"callray.session pulled in: {out.stdout.strip()}"
