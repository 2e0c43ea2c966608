"""Serve the proxy under test, as production does, for bench/overhead.py.

    python bench/proxy_server.py --port 18000 --upstream http://127.0.0.1:18081/v1 [--log-level info] [--app full]

`--app proxy` serves `create_app(settings)` (the proxy without the UI); `--app full` serves
`app.build_app(settings)` (the proxy with the Gradio page mounted at "/"), as `python app.py`
does. Logging is configured as `app.py` configures it (`proxy.logs.configure_logging`, uvicorn
with `log_config=None`), so LOG_LEVEL=info costs what it costs in production. uvicorn picks its
event loop and HTTP parser itself ("auto": uvloop and httptools when installed); the choice is
printed on start. The code under test is whatever `proxy` package is first on sys.path: run with
`--repo DIR` (or PYTHONPATH) to serve a patched copy.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

OPENAI_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
PROXY_KEY = "pk-bench-proxy-key"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--fd", type=int, help="serve on this inherited, listening socket instead")
    parser.add_argument("--upstream", required=True, help="OPENAI_BASE_URL, e.g. http://127.0.0.1:18081/v1")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--app", default="proxy", choices=["proxy", "full"])
    parser.add_argument(
        "--access-log", default="off", choices=["on", "off"], help="uvicorn's own access line (app.py: off)"
    )
    parser.add_argument(
        "--gc-freeze", default="on", choices=["on", "off"], help="app.py's GC set-up (app.py: on)"
    )
    parser.add_argument("--data-dir", help="DATA_DIR (default: a new temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="another setting")
    parser.add_argument("--env-file", help="more settings, KEY=VALUE lines (e.g. the owner controls to measure)")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()

    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    elif args.port is not None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
    else:
        parser.error("give --port or --fd")
    port = sock.getsockname()[1]

    sys.path.insert(0, os.path.abspath(args.repo))
    import uvicorn

    from proxy.config import load_settings
    from proxy.errors import Redactor

    settings = load_settings(
        {
            "OPENAI_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": args.upstream,
            "PROXY_KEY": PROXY_KEY,
            "CHECK_KEYS": "false",
            "LOG_LEVEL": args.log_level,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": args.data_dir or tempfile.mkdtemp(prefix="proxy-bench-data-"),
            **dict(item.split("=", 1) for item in args.set),
        },
        env_file=args.env_file,
    )
    try:
        from proxy.logs import configure_logging
    except ImportError:  # an older tree: plain logging at the configured level
        logging.basicConfig(level=settings.log_level.upper())
    else:
        configure_logging(settings.log_level, Redactor(settings.secrets))

    if args.app == "full":
        from app import build_app

        app = build_app(settings)
    else:
        from proxy.server import create_app

        app = create_app(settings)

    # As app.py runs uvicorn (log_config=None, proxy_headers off, uvicorn's own access
    # log left at its default, on); keep in step with app.py.
    access_log = args.access_log == "on"
    options = dict(host="127.0.0.1", port=port, log_config=None, proxy_headers=False, access_log=access_log)
    try:
        from proxy.guard import server_config  # app.py's server: uvicorn with the connection guard
    except ImportError:  # an older tree: plain uvicorn
        config = uvicorn.Config(app, **options)
    else:
        config = server_config(app, settings, **options)
    config.load()
    loop_factory = config.get_loop_factory()
    loop_name = getattr(loop_factory, "__module__", "asyncio") if loop_factory else "asyncio"
    print(
        f"serving {args.app} on 127.0.0.1:{port}: http={config.http_protocol_class.__name__} "
        f"loop={loop_name} log_level={args.log_level} pid={os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    if args.gc_freeze == "on":  # as app.py: frozen heap and its collection thresholds
        try:
            from app import settle_heap
        except ImportError:  # an older tree: the freeze alone
            import gc

            gc.collect()
            gc.freeze()
        else:
            settle_heap()
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
