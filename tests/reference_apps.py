"""Reference apps for `pipenv run bench --compare`: anonymous `GET /users/{id}`.

Each is what a new project starts from, with its library's defaults: a bare ormar 0.26
app and a SQLAlchemy 2 async ORM one. Both read the `users` table that the migrations
create, at DATABASE_URL (an async driver's URL: the benchmark sets it).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import ormar
import sqlalchemy
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

URL = os.environ["DATABASE_URL"]

# Bare ormar 0.26 -------------------------------------------------------------------

database = ormar.DatabaseConnection(URL)
base_config = ormar.OrmarConfig(database=database, metadata=sqlalchemy.MetaData())


class Users(ormar.Model):
    ormar_config = base_config.copy(tablename="users")

    id: int = ormar.Integer(primary_key=True)
    email: str = ormar.String(max_length=64, unique=True)
    password: str = ormar.String(max_length=128)
    is_active: bool = ormar.Boolean(default=True)


@asynccontextmanager
async def ormar_lifespan(app: FastAPI) -> AsyncIterator[None]:
    await database.connect()
    yield
    await database.disconnect()


ormar_app = FastAPI(lifespan=ormar_lifespan)


@ormar_app.get(
    "/users/{user_id}", response_model=Users.get_pydantic(exclude={"password"})
)
async def ormar_get_user(user_id: int) -> Users:
    return await Users.objects.get(id=user_id)


# SQLAlchemy 2 async ORM ------------------------------------------------------------

engine = create_async_engine(URL)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    password: Mapped[str]
    is_active: Mapped[bool]


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    is_active: bool


@asynccontextmanager
async def sqlalchemy_lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await engine.dispose()


sqlalchemy_app = FastAPI(lifespan=sqlalchemy_lifespan)


@sqlalchemy_app.get("/users/{user_id}", response_model=UserRead)
async def sqlalchemy_get_user(user_id: int) -> User:
    async with Session() as session:
        user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(404)
    return user
