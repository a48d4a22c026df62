"""The app's wiring: its settings, lifespan, middleware, error answers and routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

import accounts
from accounts import outbox
from core import errors, health
from core.body_limit import BodySizeLimit
from core.settings import settings
from db import database


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not database.is_connected:
        await database.connect()
    await health.check_at_start()  # warns of a database unlike the models
    async with outbox.sending():  # mail goes out while the app runs
        yield
    if database.is_connected:
        await database.disconnect()


# /docs serves Swagger UI from the package, not from a CDN. No /redoc: ReDoc would
# still load its logo from Redocly's.
app = FastAPIOffline(
    title="FastAPI + ormar + alembic",
    lifespan=lifespan,
    generate_unique_id_function=lambda route: route.name,  # operationId: create_user
    redoc_url=None,
    exception_handlers={
        RequestValidationError: errors.validation_failed,
        **dict.fromkeys(errors.DATABASE_FAULTS, errors.database_error),
        500: errors.internal_error,  # a bug: JSON like every other error
    },
)

# Middleware --------------------------------------------------------------------------

app.add_middleware(BodySizeLimit, max_size=settings.MAX_BODY_SIZE)
if settings.CORS_ORIGINS:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.CORS_ORIGINS,
        allow_methods=["*"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After"],
    )

# Errors: every answer `{"detail": ...}`, declared in /openapi.json ----------------------

app.openapi = lambda: errors.openapi(app)  # type: ignore[method-assign]

# Routes ------------------------------------------------------------------------------

app.include_router(accounts.router)
app.include_router(health.router)
