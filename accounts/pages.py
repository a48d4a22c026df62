"""The pages mailed links open while PUBLIC_URL is the app (its default)."""

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


def inline_source(html: str, tag: str) -> str:
    """The CSP source that lets the page's one inline `tag` run, and nothing else."""
    [content] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
    return f"'sha256-{digest}'"


PAGES = Path(__file__).parent / "pages"
SCRIPT = (PAGES / "link.js").read_text()  # the same in each page, its form aside


def page(name: str) -> Callable[[], Awaitable[HTMLResponse]]:
    """Serve accounts/pages/{name}.html with the script inline, it and the page's
    style alone allowed."""
    html = (PAGES / f"{name}.html").read_text()
    html = html.replace("<script></script>", f"<script>\n{SCRIPT}</script>")
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
