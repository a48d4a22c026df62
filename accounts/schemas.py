"""What clients send to the account routes and what they get back."""

from typing import Annotated, Self, cast

import sqlalchemy
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    TypeAdapter,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError
from zxcvbn.frequency_lists import FREQUENCY_LISTS

from accounts import passwords
from db import Users

# Lower-cased: Alice@Example.COM is alice@example.com. As long as the model's column.
EMAIL_LENGTH = cast(sqlalchemy.String, Users.ormar_config.table.c.email.type).length
Email = Annotated[EmailStr, AfterValidator(str.lower), Field(max_length=EMAIL_LENGTH)]
Password = Annotated[str, Field(min_length=8, max_length=passwords.MAX_LENGTH)]
# The account's password, checked as it is: the rules for a new one may have changed.
CurrentPassword = Annotated[str, Field(max_length=passwords.MAX_LENGTH)]
email_address = TypeAdapter(Email)
# zxcvbn's list of the 30,000 passwords most often found in leaks, lower-cased.
COMMON_PASSWORDS = frozenset(FREQUENCY_LISTS["passwords"])


def uncommon(password: str) -> str:
    if password.lower() in COMMON_PASSWORDS:  # a 422 that quotes nothing
        raise PydanticCustomError(
            "common_password", "This password is one of the most common; choose another"
        )
    return password


# A password to be set: refused before any hashing if it is a common one.
NewPassword = Annotated[Password, AfterValidator(uncommon)]


class UserCreate(BaseModel):
    email: Email
    password: NewPassword


# What takes the account over: changing either needs `current_password`.
CREDENTIALS = frozenset({"email", "password"})


class UserUpdate(BaseModel):
    """Leave a field out to keep it; null clears an optional one."""

    model_config = ConfigDict(extra="forbid")  # `is_active` and typos are a 422

    # Left out, None; never null (a 422): their columns are NOT NULL.
    email: Annotated[Email, Field(default=None)]
    password: Annotated[NewPassword, Field(default=None)]
    current_password: CurrentPassword | None = None

    @model_validator(mode="after")
    def current_password_for_credentials(self) -> Self:
        # A stolen token alone must not be enough to take the account over.
        if CREDENTIALS & self.model_fields_set and self.current_password is None:
            raise PydanticCustomError(
                "current_password_missing",
                "current_password is required to change email or password",
            )
        return self


class UserDelete(BaseModel):
    current_password: CurrentPassword


# A mailed link's token: 43 characters as issued; longer ones are no token.
LinkToken = Annotated[str, Field(max_length=64)]


class EmailVerification(BaseModel):
    token: LinkToken
    password: CurrentPassword  # the account's: whoever signed up or asked to move it


class PasswordResetRequest(BaseModel):
    email: Email


class PasswordReset(BaseModel):
    token: LinkToken
    password: NewPassword


class Message(BaseModel):
    message: str  # what happens next, and nothing of any account


# An allowlist, from the model: a new column stays private until it is added here.
UserRead = create_model(
    "UserRead", __base__=Users.get_pydantic(include={"id", "email", "is_active"})
)


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
