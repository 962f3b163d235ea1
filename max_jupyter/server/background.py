"""``BackgroundServer``: uvicorn in a daemon thread of the kernel, serving the kernel's own
Session (its worker, its live mix) while the notebook goes on."""
from __future__ import annotations

import threading
import time

import uvicorn

from max_jupyter.errors import BadArgumentError, MaxJupyterError
from max_jupyter.server.app import DEFAULT_MODEL_NAME, create_app
from max_jupyter.server.gate import DEFAULT_MAX_BODY_BYTES
from max_jupyter.validation import check_int

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class BackgroundServer:
    """Serves ``session`` at ``http://host:port`` from a thread (``port=0``: a free port,
    known after ``start``). Binds 127.0.0.1 unless told otherwise; ``api_key`` as in
    ``create_app``, as are ``max_queue`` and ``max_body_bytes``. ``log_level``: uvicorn's
    loggers' level (warnings only by default, to keep notebooks quiet; they log through the
    kernel's own logging set-up)."""

    def __init__(self, session, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, *, max_queue: int = 8,
                 model_name: str = DEFAULT_MODEL_NAME, log_level: str = "warning",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if not isinstance(host, str) or not host:
            raise BadArgumentError(f"host={host!r} must be a non-empty str such as '127.0.0.1'.")
        self.session, self.host = session, host
        self.port = check_int("port", port, low=0, high=65535, fix="use 0..65535 (0: any free port)")
        self._requested_port = self.port
        self.app = create_app(session, api_key=api_key, max_queue=max_queue, model_name=model_name,
                              max_body_bytes=max_body_bytes)
        self._config = uvicorn.Config(self.app, host=host, port=self.port, log_level=log_level,
                                      log_config=None,  # leave the kernel's logging set-up alone
                                      timeout_graceful_shutdown=2, lifespan="off")
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(
            self._server and self._server.started)

    def start(self) -> str:
        """Start serving; returns the URL once the socket listens. Raises
        ``MaxJupyterError`` if the server is already running or uvicorn fails to start
        (e.g. the port is taken)."""
        if self.running:
            raise MaxJupyterError(f"the server is already running at {self.url}; stop() it first.")
        self.port = self._requested_port
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._server.run, name="max-jupyter-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._thread.join(timeout=STOP_TIMEOUT_S)
                raise MaxJupyterError(f"the server did not start on {self.url} (is the port "
                                      "taken? uvicorn's log above says why); try another port.")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.url

    def stop(self) -> None:
        """Stop the generations it started, close the socket, join the thread (a no-op when
        not running). The Session stays open."""
        if self._thread is None:
            return
        self.app.state.admission.stop_all()
        self._server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=STOP_TIMEOUT_S)
        self._thread = None

    def __repr__(self) -> str:
        return f"BackgroundServer({self.url}, {'running' if self.running else 'stopped'})"
