"""The account routes: sign up and prove the address, log in and out, reset the
password, and each user's own account."""

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from accounts import links, outbox, passwords, sessions, throttle
from accounts.models import Devices, Tokens
from accounts.schemas import (
    CREDENTIALS,
    EmailVerification,
    Message,
    PasswordReset,
    PasswordResetRequest,
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
CONFLICT: Answers = {409: {"description": "The account changed meanwhile"}}
BAD_LINK = HTTPException(status.HTTP_400_BAD_REQUEST, "Invalid or expired link")
LINK_ANSWERS: Answers = {400: {"description": "Invalid, used or expired link"}}
# The answers that say nothing of any account: the same for every address.
SIGNED_UP = Message(message="Check your inbox to finish signing up")
RESET_REQUESTED = Message(
    message="If an account has that address, a link to reset its password is on its way"
)
EMAIL_CHANGE_REQUESTED = Message(message="Check the new address's inbox to confirm it")


async def check_current_password(
    user: Users, password: str, client: str, device: str | None
) -> None:
    """403 unless `password` is the user's; counted like a log-in (429 past it)."""
    valid, _ = await throttle.check_password(
        password, user, user.email, client, device, held=True
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


@router.post("/users", status_code=status.HTTP_202_ACCEPTED, responses=TOO_MANY)
async def create_user(body: UserCreate, client: ClientAddress) -> Message:
    """Sign up: the address is mailed a link that proves it (for
    `POST /auth/verify-email`), or, if it has an account, a notice."""
    await throttle.count_request("sign-up", client)  # before any hashing
    # One hash for every address: the hashing queue's 429 and 503 apply alike.
    password = await throttle.in_hashing_thread(
        client, passwords.hash_password, body.password
    )
    allowed = await links.within_cap("sign-up", body.email)
    await outbox.sign_up(body.email, password, allowed)
    return SIGNED_UP


@router.post(
    "/auth/verify-email",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**LINK_ANSWERS, **WRONG_PASSWORD, **TOO_MANY},
)
async def verify_email(
    body: EmailVerification, client: ClientAddress, device: DeviceCookie
) -> None:
    """Prove an address with the token of a link mailed to it and the account's
    password: a sign-up's, or an email change's, which then takes effect."""
    link = await links.use_link(body.token, "verify", "email", keep=True)
    user = await Users.objects.get_or_none(id=link["user_id"]) if link else None
    if link is None or user is None:
        raise BAD_LINK
    # The mail's reader alone cannot prove an account a stranger made with (or
    # wants to move to) their address: the stranger's password would log in to it.
    await check_current_password(user, body.password, client, device)
    async with database.transaction():  # a 400 leaves all as it was
        link = await links.use_link(body.token, "verify", "email")
        if link is None or link["user_id"] != user.id:
            raise BAD_LINK
        # A sign-up's link proves the address the account has; a change's, the new.
        current = link["email"] if link["purpose"] == "verify" else user.email
        if link["email"] != user.email:  # the old address's links go with it
            await outbox.end_links(user.id, user.email)
        try:
            proven = await Users.objects.filter(
                id=user.id, email=current, password=user.password
            ).update(email=link["email"], is_verified=True)
        except IntegrityError as error:  # the new address has an account by now
            if not links.is_unique_violation(error):
                raise
            proven = 0
        if not proven:
            raise BAD_LINK
        if link["email"] != user.email:
            await outbox.post("moved", user.email)


@router.post(
    "/auth/password-reset", status_code=status.HTTP_202_ACCEPTED, responses=TOO_MANY
)
async def request_password_reset(
    body: PasswordResetRequest, client: ClientAddress
) -> Message:
    """Mail a link to choose a new password (for `POST /auth/password-reset/confirm`)
    if the address has an account; if not, a notice that no account has it."""
    await throttle.count_request("password reset", client)
    if await links.within_cap("reset", body.email):  # a link, or a notice
        await outbox.post("reset", body.email)
    return RESET_REQUESTED


@router.post(
    "/auth/password-reset/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**LINK_ANSWERS, **TOO_MANY},
)
async def reset_password(
    body: PasswordReset, client: ClientAddress, request: Request, response: Response
) -> None:
    """Set a new password with a reset link's token. Every session and device ends
    but this client, which logs in as the account's device; the address is proven."""
    password = await throttle.in_hashing_thread(
        client, passwords.hash_password, body.password
    )
    async with database.transaction():
        link = await links.use_link(body.token, "reset")
        if link is None:
            raise BAD_LINK
        user = link["user_id"]
        await Users.objects.filter(id=user).update(password=password, is_verified=True)
        # A stranger's password, sessions and links from before do not survive it.
        for table in (Tokens, Devices):
            await table.objects.filter(user=user).delete()
        await throttle.add_device(request, response, user)
        await outbox.end_links(user, link["email"])
        await outbox.post("password", link["email"])


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
    """Log in with the email as `username`; answers a bearer token, and to a client
    without one a `device` cookie: with it, the client logs in to each account it
    has logged in to while others are refused."""
    try:  # the same rules as at sign-up: what could not sign up is no account
        email = email_address.validate_python(form.username)
    except ValidationError:  # (and PostgreSQL refuses text with a NUL byte)
        email = None
    user = await Users.objects.get_or_none(email=email) if email else None
    account = email or form.username  # unknown ones are counted alike
    valid, new_hash = await throttle.check_password(
        form.password, user, account, client, device
    )
    if user is None or not valid or not user.is_active or not user.is_verified:
        raise NOT_AUTHENTICATED
    stored_hash = user.password
    rehashed = Users.objects.filter(id=user.id, password=stored_hash)
    if new_hash and await rehashed.update(password=new_hash):  # older parameters
        stored_hash = new_hash
    token = secrets.token_urlsafe(32)
    # A cookie is never replaced: the client stays a device of each account it logs
    # in to, so a log-in to another's account takes no device away from anyone.
    cookie = device or throttle.new_device_cookie(request, response)
    if not await sessions.start_session(
        user.id,
        stored_hash,
        sessions.token_digest(token),
        throttle.device_digest(cookie, user.id) if cookie else None,
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
    responses={
        202: {"model": Message, "description": "A link was mailed to the new email"},
        **WRONG_PASSWORD,
        **CONFLICT,
        **TOO_MANY,
    },
)
async def update_me(
    body: UserUpdate,
    me: CurrentUser,
    digest: PresentedDigest,
    client: ClientAddress,
    device: DeviceCookie,
) -> Users | JSONResponse:
    """Change the fields sent (null clears one); the email and the password need
    `current_password`, other fields (see `UserUpdate`) do not. A new email takes
    effect once the link mailed to it is opened (202)."""
    changes: dict[str, Any] = body.model_dump(
        exclude_unset=True, exclude={"current_password"}
    )
    email = changes.pop("email", None)  # never null: the column is NOT NULL
    if CREDENTIALS.isdisjoint(changes) and email is None:
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
        held = await verified.update(**changes) if changes else await verified.exists()
        if not held:
            raise await changed_meanwhile(me)
        if "password" in changes:
            # Every other session and device ends with it, and every mailed link.
            await Tokens.objects.filter(user=me.id).exclude(digest=digest).delete()
            mine = throttle.device_digest(device, me.id) if device else None
            await Devices.objects.filter(user=me.id).exclude(digest=mine).delete()
            await outbox.end_links(me.id, me.email)
            await outbox.post("password", me.email)
    me.update_from_dict(changes)
    if email is not None:  # a link, or if the address is taken a notice
        if await links.within_cap("email", email):
            await outbox.post("email", email, me.id)
        return JSONResponse(
            EMAIL_CHANGE_REQUESTED.model_dump(), status.HTTP_202_ACCEPTED
        )
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
