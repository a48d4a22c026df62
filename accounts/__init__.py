"""The template's accounts: sign-up, log-in sessions, the log-in throttle, and
`CurrentUser`, the logged-in user for any route (`me: CurrentUser`)."""

from accounts import pages
from accounts.routes import router
from accounts.sessions import CurrentUser

router.include_router(pages.router)  # the pages that mailed links open

__all__ = ["CurrentUser", "router"]
