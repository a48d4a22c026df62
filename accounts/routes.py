"""The account routes: sign up, log in and out, and each user's own account."""

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from accounts import passwords, sessions, throttle
from accounts.models import Devices, Tokens
from accounts.schemas import (
    CREDENTIALS,
    Token,
    UserCreate,
    UserDelete,
    UserRead,
    UserUpdate,
    email_address,
)
from accounts.sessions import NOT_AUTHENTICATED, CurrentUser, PresentedDigest
from accounts.throttle import ClientAddress, DeviceCookie
from db import Users, database

router = APIRouter(tags=["accounts"])

# Answers these routes add to the ones every route shares (main.py declares those).
Answers = dict[int | str, dict[str, Any]]
TOO_MANY: Answers = {
    429: {"description": "Too many tries; retry after `Retry-After` seconds"}
}
WRONG_PASSWORD: Answers = {403: {"description": "Wrong current password"}}
CONFLICT: Answers = {
    409: {"description": "Email taken, or the account changed meanwhile"}
}


@contextmanager
def email_must_be_free() -> Iterator[None]:
    """Answer 409 when a write breaks the unique email constraint.

    The database decides, so two requests racing for one address cannot both succeed.
    """
    try:
        yield
    except IntegrityError as error:
        postgresql_code = getattr(error.orig, "sqlstate", None)
        sqlite_code = getattr(error.orig, "sqlite_errorname", None)
        if postgresql_code == "23505" or sqlite_code == "SQLITE_CONSTRAINT_UNIQUE":
            raise HTTPException(
                status.HTTP_409_CONFLICT, "Email already registered"
            ) from None
        raise


async def check_current_password(
    user: Users, password: str, client: str, device: str | None
) -> None:
    """403 unless `password` is the user's; counted like a log-in (429 past it)."""
    valid, _ = await throttle.check_password(password, user, user.email, client, device)
    if not valid:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Wrong current password")


async def changed_meanwhile(user: Users) -> HTTPException:
    """The answer to a write whose condition (the password verified) no longer held."""
    if await Users.objects.filter(id=user.id).exists():
        return HTTPException(
            status.HTTP_409_CONFLICT, "The account changed meanwhile; log in again"
        )
    return NOT_AUTHENTICATED  # deleted meanwhile


@router.post(
    "/users",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "Email already registered"}, **TOO_MANY},
)
async def create_user(body: UserCreate, client: ClientAddress) -> Users:
    """Sign up."""
    password = await throttle.in_hashing_thread(
        client, passwords.hash_password, body.password
    )
    with email_must_be_free():
        return await Users.objects.create(email=body.email, password=password)


@router.post(
    "/auth/token",
    responses={401: {"description": "Wrong email or password"}, **TOO_MANY},
)
async def log_in(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    response: Response,
    client: ClientAddress,
    device: DeviceCookie,
) -> Token:
    """Log in with the email as `username`; answers a bearer token, and a `device`
    cookie that lets this client log in to the account while others are refused."""
    try:  # the same rules as at sign-up: what could not sign up is no account
        email = email_address.validate_python(form.username)
    except ValidationError:  # (and PostgreSQL refuses text with a NUL byte)
        email = None
    user = await Users.objects.get_or_none(email=email) if email else None
    account = email or form.username  # unknown ones are counted alike
    valid, new_hash = await throttle.check_password(
        form.password, user, account, client, device
    )
    if user is None or not valid or not user.is_active:
        raise NOT_AUTHENTICATED
    stored_hash = user.password
    rehashed = Users.objects.filter(id=user.id, password=stored_hash)
    if new_hash and await rehashed.update(password=new_hash):  # older parameters
        stored_hash = new_hash
    token = secrets.token_urlsafe(32)
    if await throttle.is_device_of(device, user):
        device = None  # it has one: no new one
    else:
        device = throttle.new_device_cookie(request, response)
    if not await sessions.start_session(
        user.id, stored_hash, sessions.token_digest(token), device
    ):
        raise NOT_AUTHENTICATED  # deleted, deactivated or its password changed
    response.headers["Cache-Control"] = "no-store"
    return Token(access_token=token)


@router.delete(
    "/auth/token",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(sessions.current_user)],
)
async def log_out(digest: PresentedDigest) -> None:
    """End this token's session at once."""
    await Tokens.objects.delete(digest=digest)


@router.get("/users/me", response_model=UserRead)
async def read_me(me: CurrentUser) -> Users:
    return me


@router.patch(
    "/users/me",
    response_model=UserRead,
    responses={**WRONG_PASSWORD, **CONFLICT, **TOO_MANY},
)
async def update_me(
    body: UserUpdate,
    me: CurrentUser,
    digest: PresentedDigest,
    client: ClientAddress,
    device: DeviceCookie,
) -> Users:
    """Change the fields sent (null clears one); the email and the password need
    `current_password`, other fields (see `UserUpdate`) do not."""
    changes: dict[str, Any] = body.model_dump(
        exclude_unset=True, exclude={"current_password"}
    )
    if CREDENTIALS.isdisjoint(changes):
        # The owner's own fields: the token is enough, and no password is guessed.
        if changes and not await Users.objects.filter(id=me.id).update(**changes):
            raise NOT_AUTHENTICATED  # deleted meanwhile
        me.update_from_dict(changes)
        return me
    await check_current_password(me, body.current_password or "", client, device)
    if "password" in changes:
        changes["password"] = await throttle.in_hashing_thread(
            client, passwords.hash_password, changes["password"]
        )
    async with database.transaction():
        # Only if the password is still the one just verified: of two changes at
        # once, one wins and the other gets a 409.
        verified = Users.objects.filter(id=me.id, password=me.password)
        with email_must_be_free():
            if not await verified.update(**changes):
                raise await changed_meanwhile(me)
        if "password" in changes:  # every other session and device ends with it
            await Tokens.objects.filter(user=me.id).exclude(digest=digest).delete()
            await Devices.objects.filter(user=me.id).exclude(digest=device).delete()
    me.update_from_dict(changes)
    return me


@router.delete(
    "/users/me",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**WRONG_PASSWORD, **CONFLICT, **TOO_MANY},
)
async def delete_me(
    body: UserDelete, me: CurrentUser, client: ClientAddress, device: DeviceCookie
) -> None:
    """Delete the account (needs `current_password`); its sessions go with it."""
    await check_current_password(me, body.current_password, client, device)
    if not await Users.objects.filter(id=me.id, password=me.password).delete():
        raise await changed_meanwhile(me)
