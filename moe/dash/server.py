"""The local dashboard: a small HTTP server (stdlib only) and the standalone-page export.

Routes: ``/`` the page, ``/static/<file>`` its script and style (shipped inside this package:
nothing is fetched from a CDN, so it works with no internet), ``/api/snapshot`` every run's
series as JSON, ``/api/version`` a fingerprint of the run files that the page polls to
refresh only when something changed.  It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from moe.dash.data import fingerprint, snapshot

STATIC = {"dash.js": "text/javascript; charset=utf-8", "dash.css": "text/css; charset=utf-8"}


def static_text(name: str) -> str:
    return resources.files("moe.dash").joinpath("static", name).read_text(encoding="utf-8")


def page(*, refresh_s: float, inline_data: dict | None = None) -> str:
    """The dashboard's HTML.  With ``inline_data`` everything (style, script, data) is inlined:
    a standalone file that opens anywhere with no server."""
    html = static_text("index.html")
    if inline_data is None:
        head = '<link rel="stylesheet" href="/static/dash.css">'
        body = (
            f'<script>window.MOE_DASH = {{"refresh_s": {refresh_s}}};</script>\n<script src="/static/dash.js"></script>'
        )
    else:
        data = json.dumps(inline_data, allow_nan=False).replace("</", "<\\/")  # no early </script>
        head = f"<style>\n{static_text('dash.css')}\n</style>"
        script = static_text("dash.js")
        body = f'<script>window.MOE_DASH = {{"refresh_s": 0, "data": {data}}};</script>\n<script>\n{script}\n</script>'
    return html.replace("<!--HEAD-->", head).replace("<!--BODY-->", body)


def export(root: Path, out: Path, *, cv_threshold: float = 1.0) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(refresh_s=0, inline_data=_clean(snapshot(root, cv_threshold=cv_threshold))), encoding="utf-8")
    return out


def _clean(obj):
    """NaN/inf -> None: strict JSON for the browser."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


class _Handler(BaseHTTPRequestHandler):
    server_version = "moe-dash"

    def __init__(self, *args, root: Path, refresh_s: float, cv_threshold: float, **kw):
        self.root, self.refresh_s, self.cv_threshold = root, refresh_s, cv_threshold
        super().__init__(*args, **kw)

    def log_message(self, fmt, *args):  # quiet: the terminal shows the URL and errors only
        pass

    def _send(self, body: str | bytes, ctype: str, code: int = 200) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = urlparse(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(page(refresh_s=self.refresh_s), "text/html; charset=utf-8")
            elif path.startswith("/static/") and path[8:] in STATIC:
                self._send(static_text(path[8:]), STATIC[path[8:]])
            elif path == "/api/version":
                self._send(json.dumps({"version": fingerprint(self.root)}), "application/json")
            elif path == "/api/snapshot":
                snap = snapshot(self.root, cv_threshold=self.cv_threshold)
                snap["version"] = fingerprint(self.root)
                self._send(json.dumps(_clean(snap), allow_nan=False), "application/json")
            elif path == "/favicon.ico":
                self._send(b"", "image/x-icon", 204)
            else:
                self._send(json.dumps({"error": f"no such page: {path}"}), "application/json", 404)
        except (BrokenPipeError, ConnectionResetError):
            pass


def make_server(
    root: Path, *, host: str = "127.0.0.1", port: int = 8765, refresh_s: float = 5.0, cv_threshold: float = 1.0
) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0: any free port; see ``server.server_address``)."""
    handler = partial(_Handler, root=Path(root), refresh_s=refresh_s, cv_threshold=cv_threshold)
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd


def serve_in_thread(httpd: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=httpd.serve_forever, name="moe-dash", daemon=True)
    t.start()
    return t
