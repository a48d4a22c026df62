"""The pages that mailed links open while PUBLIC_URL is the app itself (its default):
each POSTs the token in the link's fragment to the API. A front end of your own, at
PUBLIC_URL, has pages of its own instead."""

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


def inline_source(html: str, tag: str) -> str:
    """The Content-Security-Policy source of the page's one inline `tag` (script,
    style): its SHA-256, which lets it run and nothing else."""
    [content] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def page(name: str) -> Callable[[], Awaitable[HTMLResponse]]:
    """Serve accounts/pages/{name}.html: its own script and style run, it talks to
    the API alone, in no other site's frame, sending no Referer, kept in no cache."""
    html = (Path(__file__).parent / "pages" / f"{name}.html").read_text()
    script, style = (inline_source(html, tag) for tag in ("script", "style"))
    headers = {
        "Content-Security-Policy": f"default-src 'none'; script-src {script}; "
        f"style-src {style}; connect-src 'self'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }

    async def serve() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return serve


for name in ("verify-email", "reset-password"):
    router.add_api_route(f"/{name}", page(name), name=f"{name.replace('-', '_')}_page")
