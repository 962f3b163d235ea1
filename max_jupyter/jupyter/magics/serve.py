"""``%max_serve``: the session over an OpenAI-compatible HTTP API from a kernel thread."""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import parse, usage_errors


@magic_arguments()
@argument("command", nargs="?", default="start", choices=["start", "stop", "status"],
          help="start (default), stop, or status.")
@argument("--port", type=int, default=8000, help="TCP port (0: any free port).")
@argument("--host", default="127.0.0.1", help="Interface to bind (default: this machine only).")
@argument("--api-key", default=None, metavar="KEY", help="Require 'Authorization: Bearer KEY'.")
def max_serve(magics, line: str = ""):
    """Serve the session over an OpenAI-compatible HTTP API from a thread of the kernel."""
    args = parse(max_serve, line)
    if args.command == "stop":
        if magics.server is None or not magics.server.running:
            print("the server is not running")
            return
        magics.server.stop()
        print("server stopped")
        return
    if args.command == "status":
        print(magics.server if magics.server is not None else "no server")
        return
    session = magics.need_session()
    try:
        from max_jupyter.server import BackgroundServer
    except ImportError as e:
        raise UsageError(f"%max_serve needs the server extra ({e.name} is missing): "
                         f"pip install 'max-jupyter[server]'") from None

    if magics.server is not None and magics.server.running:
        raise UsageError(f"the server is already running at {magics.server.url}; %max_serve stop first.")
    with usage_errors():
        server = BackgroundServer(session, host=args.host, port=args.port, api_key=args.api_key)
        url = server.start()
    magics.server = server
    print(f"serving at {url}/v1 (OpenAI-compatible); %max_serve stop to end")
    return url


def stop_server(magics) -> None:
    """Stop ``%max_serve``'s server if it runs (the session stays open)."""
    if magics.server is not None:
        magics.server.stop()
        magics.server = None
