"""The status page's files: the HTML page at ``GET /`` and ``/static/<name>``.

The page, its stylesheet and its script ship in ``threshold/server/static``
(package data: no CDN, no build step). The script reads ``GET /clients``,
``GET /tunnels/status`` and ``GET /status/history`` (and listens to
``GET /events`` when the server has it) and draws everything with DOM
text nodes and SVG, never with markup built from data.

Every answer here carries a strict Content-Security-Policy (scripts and
styles from this origin only, no inline script, nothing framed), and only
the files listed in :data:`STATIC_TYPES` found in the folder are served:
a name is looked up, never joined to a path, so no request reaches another
file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from twisted.web.iweb import IRequest

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PAGE",
    "STATIC_TYPES",
    "after_sample",
    "page",
    "set_security_headers",
    "static_file",
]

#: The page itself (in the static folder, served at ``/`` only).
PAGE = "index.html"

#: Content types by extension of the files that may be served.
STATIC_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}

#: Scripts, styles, images and requests from this origin only; no inline
#: script or style, no plugin, no frame, no form, no <base>.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)

#: The files change only with the package: a browser may keep them an
#: hour; the page and the data are never stored.
STATIC_CACHE = b"public, max-age=3600"
NO_STORE = b"no-store"


@cache
def _files() -> dict[str, bytes]:
    """Every servable file of the static folder, read once."""
    folder = resources.files("threshold.server") / "static"
    out = {}
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and (suffix in STATIC_TYPES or name == PAGE):
            out[name] = entry.read_bytes()
    return out


def set_security_headers(request: IRequest, cache_control: bytes = NO_STORE) -> None:
    """The headers every status page answer carries."""
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cache-control", cache_control)


def page(request: IRequest) -> bytes:
    """The status page's HTML."""
    set_security_headers(request)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return _files()[PAGE]


def static_file(request: IRequest, name: str) -> bytes | None:
    """A file of the static folder, or None when there is no such file."""
    body = _files().get(name)
    if body is None or name == PAGE:
        return None
    set_security_headers(request, STATIC_CACHE)
    request.setHeader(b"content-type", STATIC_TYPES[name[name.rfind(".") :]])
    return body


def after_sample(request: IRequest) -> int | None:
    """``?after=N`` of ``GET /status/history``: a sample number, or None.

    Raises ValueError saying what is wrong with it.
    """
    values = request.args.get(b"after")
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("after is given more than once")
    raw = values[0].decode("latin-1")
    # Digits only: no sign, no space, no "1e3", and short enough to parse.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ValueError(
            f"after must be a sample number (an integer from 0), not {raw[:40]!r}"
        )
    return int(raw)
