"""``%max_load``: load the models into a Session (closing the previous one)."""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import parse, usage_errors


@magic_arguments()
@argument("big", nargs="?", default=None,
          help="Big model: a local HF folder, a .gguf file or a fetched name such as "
               "qwen2.5-coder-1.5b (make real-pair) (default: the embedded SmolLM2).")
@argument("--small", default=None, help="Small model: a folder, a .gguf, a fetched name such as "
                                        "qwen2.5-coder-0.5b, or 'same' (the big one again).")
@argument("--backend", default="auto", help="auto, transformers, exllamav2 or exllamav3.")
@argument("--vram", type=float, default=None, metavar="GB", help="GPU memory budget in GB.")
@argument("--cache-tokens", type=int, default=None, metavar="N", help="KV cache length in tokens.")
@argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present).")
@argument("--dtype", default=None, metavar="DTYPE[,SMALL]",
          help="Weight dtype: float32, bfloat16, float16 or int8 (CPU: int8 linear layers); "
               "two, comma-separated, for the big and the small model (e.g. ,int8: the small "
               "model in int8, the big one at its default). Default: fp32 on the CPU (the "
               "small qwen2.5-coder-0.5b: int8), fp16 on CUDA.")
@argument("--store", default="default",
          help="Vector library: 'default' (kept across kernels), ':memory:' (a throwaway "
               "library), 'none' (a plain dict), or a path to a SQLite file.")
@argument("--session", default=None, metavar="VAR",
          help="Use the Session already in variable VAR instead of loading one.")
def max_load(magics, line: str = ""):
    """Load the models into a Session (closing the previous one) and print its layout."""
    from max_jupyter.session import Session

    args = parse(max_load, line)
    if args.session is not None:
        session = magics.shell.user_ns.get(args.session)
        if not isinstance(session, Session) or session.closed:
            raise UsageError(f"--session {args.session}: no open Session in that variable.")
    else:
        from max_jupyter.loading import check_devices, check_dtypes, check_sources

        dtype = args.dtype
        if dtype and "," in dtype:  # "big,small": a pair; an empty side keeps its default
            dtype = [side.strip() or None for side in dtype.split(",")]
        with usage_errors():  # a mistyped source must not cost the session that works
            check_sources(args.big, args.small, args.backend)
            has_small = args.small is not None
            check_dtypes(dtype, has_small, check_devices(args.device, None, has_small))
        magics.close_session()  # first: the memory goes back before the new models load
        store = None if args.store == "none" else args.store
        with usage_errors():
            session = Session.load(args.big, args.small, backend=args.backend,
                                   max_vram_gb=args.vram, cache_tokens=args.cache_tokens,
                                   device=args.device, dtype=dtype, store=store)
    if magics.session is not session:
        magics.close_session()
    magics.session = session
    magics.shell.user_ns["max_session"] = session
    print(f"big:   {session.big.identity.describe()}")
    if session.small is not None:
        print(f"small: {session.small.identity.describe()}")
    if session.plan is not None:
        print(session.plan)
