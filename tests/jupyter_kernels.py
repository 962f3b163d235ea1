"""Real Jupyter kernels for the widget tests: either ipykernel major version, and running
code in one through ``jupyter_client`` (stdout back, errors raised)."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import ipykernel
import pytest

IPYKERNEL_MAJORS = (7, 6)
INSTALLED_MAJOR = int(ipykernel.__version__.split(".")[0])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Skip outside CI (saying what to install); fail in CI, where everything must run."""
    if in_ci():
        pytest.fail(f"CI=true and {what}")
    pytest.skip(what)


def ipykernel_env(major: int, cache: Path) -> dict[str, str]:
    """Environment variables that make ``python -m ipykernel_launcher`` run ipykernel
    ``major``: none for the installed one; else a PYTHONPATH with that version, installed
    once with pip (no dependencies: the rest of the venv serves both) into ``cache``."""
    if major == INSTALLED_MAJOR:
        return {}
    target = cache / f"ipykernel{major}"
    if not (target / "ipykernel").is_dir():
        spec = [f"ipykernel>={major},<{major + 1}"] + (["nest-asyncio>=1.4"] if major == 6 else [])
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", str(target), *spec], capture_output=True, text=True)
        if done.returncode != 0:
            missing(f"ipykernel {major} could not be installed for the test: {done.stderr[-500:]}")
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class Kernel:
    """A kernel started with ``jupyter_client`` (``env`` added to its environment) and a
    blocking client. ``seen``: every iopub message read so far, in order."""

    def __init__(self, env: dict[str, str] | None = None, connection_file: str | None = None):
        from jupyter_client import BlockingKernelClient, KernelManager

        self.manager = None
        if connection_file is None:
            self.manager = KernelManager(kernel_name="python3")
            self.manager.start_kernel(env={**os.environ, **(env or {})})
            self.client = self.manager.client()
        else:  # an existing kernel (e.g. JupyterLab's), as a second client
            self.client = BlockingKernelClient(connection_file=connection_file)
            self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.seen: list[dict] = []

    def run(self, code: str, timeout: float = 120) -> str:
        """Execute ``code``; return its stdout; raise ``AssertionError`` with the traceback
        if it fails."""
        msg_id = self.client.execute(code)
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no end of {code[:60]!r} within {timeout} s") from None
            self.seen.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)

    def update_widget(self, comm_id: str, state: dict) -> None:
        """Send what a page sends when a widget changes: a ``comm_msg`` on the shell channel."""
        msg = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": {
            "method": "update", "state": state, "buffer_paths": []}})
        self.client.shell_channel.send(msg)

    def send_custom(self, comm_id: str, content: dict) -> None:
        """Send a widget's custom message from the page (a Button's click is
        ``{"event": "click"}``; ``model.send(...)`` in a front end sends its argument)."""
        msg = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": {
            "method": "custom", "content": content}})
        self.client.shell_channel.send(msg)

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager is not None:
            self.manager.shutdown_kernel(now=True)
