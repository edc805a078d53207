"""Start the VILA-M3 web viewer: ``python web/viewer.py --server http://127.0.0.1:8000 --port 8080``.

The viewer is a client of a running VILA-M3 MONAI Label server (HTTP only); it renders on this
machine (offscreen EGL by default, ``VTK_DEFAULT_OPENGL_WINDOW`` overrides) and serves the page on
``--host``/``--port``. Each browser tab gets a viewer of its own (its own scene, login and chat;
:mod:`vila_m3_viewer.sessions`). With auth on at the server, each tab's page asks for a user name and
password (:mod:`vila_m3_viewer.login`). Kiosk mode, for one person's machine: ``--username`` (the password
from ``VILA_M3_PASSWORD``, never the command line) or a token in ``VILA_M3_TOKEN`` logs every tab in as
that one user, without a form.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "slicer_extension" / "VILAM3Chat")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The VILA-M3 chat in a browser, on 3D Slicer's core")
    parser.add_argument("--server", default=os.environ.get("VILA_M3_SERVER", "http://127.0.0.1:8000"),
                        help="the VILA-M3 MONAI Label server (default: $VILA_M3_SERVER or http://127.0.0.1:8000)")
    parser.add_argument("--host", default="127.0.0.1", help="where the page listens (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("WEB_PORT", "8080")),
                        help="the page's port (default: $WEB_PORT or 8080)")
    parser.add_argument("--username", default=os.environ.get("VILA_M3_USERNAME", ""),
                        help="kiosk mode: every tab logs in as this user when the server's auth is on "
                             "(password: $VILA_M3_PASSWORD); default: each tab's page asks for a login")
    parser.add_argument("--encoder", default=None, choices=["jpeg", "turbo-jpeg", "png", "webp", "avif"],
                        help="image encoding of the views (default trame-slicer's; png is lossless)")
    parser.add_argument("--config", default=None, help="a web_viewer.yaml (default: configs/web_viewer.yaml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vila_m3_viewer").setLevel(logging.INFO)
    from vila_m3_viewer.app import default_view_env

    default_view_env()
    from vila_m3_viewer.app import ChatViewer
    from vila_m3_viewer.sessions import serve_tabs
    from vila_m3_viewer.settings import load_settings

    settings = load_settings(args.config)
    username, password = args.username, os.environ.get("VILA_M3_PASSWORD", "")
    token = os.environ.get("VILA_M3_TOKEN", "")

    def make_viewer(name: str) -> ChatViewer:
        return ChatViewer(args.server, username=username, password=password, token=token, settings=settings,
                          server=name, encoder=args.encoder)

    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    kiosk = f"; kiosk: every tab as '{username}'" if username else ("; kiosk: every tab with $VILA_M3_TOKEN"
                                                                   if token else "")
    print(f"VILA-M3 viewer: http://{shown}:{args.port}/ (server {args.server}; one viewer per browser tab{kiosk})",
          flush=True)
    serve_tabs(make_viewer, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
