"""``max-jupyter serve [MODEL] [--small [SMALL]] [--host] [--port] [--api-key] ...``: load a
Session and serve it with uvicorn in the foreground until Ctrl-C."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from max_jupyter.server.app import DEFAULT_MODEL_NAME
from max_jupyter.server.gate import DEFAULT_MAX_BODY_BYTES

API_KEY_ENV = "MAX_JUPYTER_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="max-jupyter", description="MAX Engine command line.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                           description="Load a Session and serve it over an OpenAI-compatible "
                                       "HTTP API (see docs/server.md).")
    serve.add_argument("model", nargs="?", default=None,
                       help="the big model: a local HF folder or .gguf file (default: the "
                            "embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--small", nargs="?", const="same", default=None,
                       help="also load a small model that watches (a folder or .gguf; the "
                            "flag alone loads the big model a second time)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on every route but /health "
                            f"(default: ${API_KEY_ENV}; none if unset)")
    serve.add_argument("--max-queue", type=int, default=8,
                       help="requests that may wait behind the running one (default 8)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help="larger request bodies are refused with 413 before parsing "
                            f"(default {DEFAULT_MAX_BODY_BYTES}: 4 MiB)")
    serve.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                       help=f"the model id clients send (default {DEFAULT_MODEL_NAME!r})")
    serve.add_argument("--backend", default="auto", help="engine backend (default auto)")
    return p


def serve(args: argparse.Namespace) -> None:
    """Load the Session, serve it in the foreground, close it on exit."""
    import uvicorn

    from max_jupyter.server.app import create_app
    from max_jupyter.session import Session

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this "
              "port can use the model. Set --api-key or $" + API_KEY_ENV + ".", file=sys.stderr)
    session = Session.load(args.model, args.small, backend=args.backend)
    try:
        app = create_app(session, api_key=args.api_key, max_queue=args.max_queue,
                         model_name=args.model_name, max_body_bytes=args.max_body_bytes)
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=2,
                    lifespan="off")
    finally:
        session.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
