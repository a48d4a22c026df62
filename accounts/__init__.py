"""The template's accounts: sign-up, log-in sessions, the log-in throttle, and
`CurrentUser`, the logged-in user for any route (`me: CurrentUser`)."""

from accounts.routes import router
from accounts.sessions import CurrentUser

__all__ = ["CurrentUser", "router"]
