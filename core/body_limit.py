"""A request body over the limit is a 413, before it is all read."""

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Answer 413 to a request body over `max_size` bytes, before it is all read.

    (FastAPI's own `max_body_size` answers plain text when Content-Length is too large.)
    """

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": "Request body too large"}, 413)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_size:
            return await too_large(scope, receive, send)
        received = 0
        answered = False

        async def receive_within_limit() -> Message:  # counts chunked bodies
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_size and not answered:
                answered = True
                await too_large(scope, receive, send)
            return {"type": "http.disconnect"} if answered else message

        async def send_unless_answered(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, receive_within_limit, send_unless_answered)
