"""The account routes: sign up, log in and out, and each user's own account."""

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from accounts import passwords, sessions, throttle
from accounts.models import Tokens
from accounts.schemas import (
    Token,
    UserCreate,
    UserDelete,
    UserRead,
    UserUpdate,
    email_address,
)
from accounts.sessions import NOT_AUTHENTICATED, CurrentUser, PresentedDigest
from accounts.throttle import ClientAddress
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


async def check_current_password(user: Users, password: str, client: str) -> None:
    valid, _ = await throttle.in_hashing_thread(
        client, passwords.verify_password, password, user.password
    )
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
    response: Response,
    client: ClientAddress,
) -> Token:
    """Log in with the email as `username`; answers a bearer token."""
    try:  # the same rules as at sign-up: what could not sign up is no account
        email = email_address.validate_python(form.username)
    except ValidationError:  # (and PostgreSQL refuses text with a NUL byte)
        email = None
    key = throttle.log_in_key(client, email or form.username)  # unknown ones alike
    user = await Users.objects.get_or_none(email=email) if email else None
    stored_hash = user.password if user else passwords.DUMMY_HASH
    valid, new_hash = await throttle.in_hashing_thread(
        client,
        passwords.verify_password,
        form.password,
        stored_hash,
        first=lambda: throttle.count_log_in(key),
    )
    if user is None or not valid or not user.is_active:
        await throttle.end_log_in_counts()
        raise NOT_AUTHENTICATED
    await throttle.end_log_in_counts(key)  # a right password: counting starts again
    rehashed = Users.objects.filter(id=user.id, password=stored_hash)
    if new_hash and await rehashed.update(password=new_hash):  # older parameters
        stored_hash = new_hash
    token = secrets.token_urlsafe(32)
    if not await sessions.start_session(
        user.id, stored_hash, sessions.token_digest(token)
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
    body: UserUpdate, me: CurrentUser, digest: PresentedDigest, client: ClientAddress
) -> Users:
    """Change the email or the password; both need `current_password`."""
    changes: dict[str, Any] = body.model_dump(
        exclude_none=True, exclude={"current_password"}
    )
    if not changes:
        return me
    await check_current_password(me, body.current_password or "", client)
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
        if "password" in changes:  # every other session ends with the old password
            await Tokens.objects.filter(user=me.id).exclude(digest=digest).delete()
    me.update_from_dict(changes)
    return me


@router.delete(
    "/users/me",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**WRONG_PASSWORD, **CONFLICT, **TOO_MANY},
)
async def delete_me(body: UserDelete, me: CurrentUser, client: ClientAddress) -> None:
    """Delete the account (needs `current_password`); its sessions go with it."""
    await check_current_password(me, body.current_password, client)
    if not await Users.objects.filter(id=me.id, password=me.password).delete():
        raise await changed_meanwhile(me)
