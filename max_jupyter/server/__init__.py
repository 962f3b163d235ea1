"""The OpenAI-compatible HTTP server over a Session (FastAPI + uvicorn: the ``server`` extra).

``create_app(session)`` builds the app; ``BackgroundServer(session).start()`` serves it from
a thread of the kernel; ``max-jupyter serve`` serves a fresh Session from the shell.
See docs/server.md.
"""
from max_jupyter.server.app import create_app
from max_jupyter.server.background import BackgroundServer

__all__ = ["BackgroundServer", "create_app"]
