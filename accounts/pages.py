"""The pages that mailed links open while PUBLIC_URL is the app itself (its default).
Each reads the token from the link's fragment and POSTs it to the API; a front end
of your own, at PUBLIC_URL, has pages of its own instead."""

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


def inline_source(html: str, tag: str) -> str:
    """The Content-Security-Policy source that lets the page's one inline `tag`
    (script, style) run, and nothing else: its SHA-256."""
    [content] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def page(name: str) -> Callable[[], Awaitable[HTMLResponse]]:
    """Serve accounts/pages/{name}.html: it runs its own script and style and
    nothing else, in no other site's frame, sending no Referer, kept in no cache."""
    html = (Path(__file__).parent / "pages" / f"{name}.html").read_text()
    policy = (
        f"default-src 'none'; script-src {inline_source(html, 'script')}; "
        f"style-src {inline_source(html, 'style')}; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }

    async def serve() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return serve


router.add_api_route("/verify-email", page("verify-email"), name="verify_email_page")
router.add_api_route(
    "/reset-password", page("reset-password"), name="reset_password_page"
)
