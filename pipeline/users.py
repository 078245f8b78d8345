"""Users and API clients of the web front end, and which runs each one owns.

These tables belong to the auth layer, not to the collector: the web process and ``enqueue.py create-user``
write them; the collector stays the only writer of ``runs`` and ``results`` (they are only read here). They
have their own MetaData so that the collector never creates or migrates them. Secrets are stored as Argon2id
hashes (argon2-cffi), never in clear.

A run's owner is part of its configuration (``RunConfig.owner``, kept in Redis and in ``runs.config``);
``user_runs`` is the index that lets a user's runs be listed and paged without reading every run's JSON.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Boolean, Column, Engine, Float, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.collect import store
from pipeline.errors import ConfigError

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("secret_hash", String(255), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("is_client", Boolean, nullable=False, default=False),  # an API client (a service), not a person
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

user_runs = Table(
    "user_runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("filename", String(255)),  # the uploaded file's own name, for people; never used as a path
    Column("created_at", Float, nullable=False),
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_SECRET = 8
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verifying a name that does not exist still costs one hash, so timing does not tell which names exist. Made
    on first use: a hash costs half a second of CPU, which every command that imports this paid at start."""
    return _hasher.hash("not a secret of anyone")


def prepare(engine: Engine) -> None:
    """The users table, and the dummy hash made now, so the first unknown name costs what the others do."""
    metadata.create_all(engine)
    _dummy_hash()


def create_user(engine: Engine, name: str, secret: str, *, admin: bool = False, client: bool = False) -> int:
    """Add a user (or an API client); ConfigError for a bad or taken name or a short secret."""
    if not NAME.fullmatch(name or ""):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"the password must have at least {MIN_SECRET} characters")
    prepare(engine)
    try:
        with engine.begin() as conn:
            created = conn.execute(
                insert(users).values(
                    name=name,
                    secret_hash=_hasher.hash(secret),
                    is_admin=admin,
                    is_client=client,
                    disabled=False,
                    created_at=time.time(),
                )
            ).inserted_primary_key
            assert created is not None  # a plain INSERT of one row
            return created[0]
    except IntegrityError:
        raise ConfigError(f"user {name!r} exists already") from None


def authenticate(engine: Engine, name: str, secret: str) -> dict[str, Any] | None:
    """The user if the name and secret match an enabled user, else None (same work either way)."""
    user = find_user(engine, name) if NAME.fullmatch(name) else None
    try:
        _hasher.verify(user["secret_hash"] if user else _dummy_hash(), secret)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user["disabled"]:
        return None
    if _hasher.check_needs_rehash(user["secret_hash"]):
        with engine.begin() as conn:
            conn.execute(update(users).where(users.c.id == user["id"]).values(secret_hash=_hasher.hash(secret)))
    return user


def find_user(engine: Engine, name: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.name == name)).mappings().first()
    return dict(row) if row else None


def record_run(engine: Engine, run_id: str, owner: str, filename: str | None) -> None:
    """Index a run under its owner (a repeated submit of the same run changes nothing)."""
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(user_runs).values(run_id=run_id, owner=owner, filename=filename, created_at=time.time())
            )
    except IntegrityError:
        pass


def run_filenames(engine: Engine, run_ids: list[str]) -> dict[str, str | None]:
    if not run_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(select(user_runs.c.run_id, user_runs.c.filename).where(user_runs.c.run_id.in_(run_ids)))
        return {run_id: filename for run_id, filename in rows}


def page_run_ids(engine: Engine, owner: str | None, offset: int, limit: int) -> tuple[list[str], int]:
    """One page of run ids, newest first, and the total: ``owner``'s runs, or every run (``None``, admins)."""
    with engine.connect() as conn:
        if owner is None:
            table, where = store.runs, store.runs.c.dataset_hash != store.UNREGISTERED
        else:
            table, where = user_runs, user_runs.c.owner == owner
        total = conn.execute(select(func.count()).select_from(table).where(where)).scalar_one()
        ids = (
            conn.execute(
                select(table.c.run_id)
                .where(where)
                .order_by(table.c.created_at.desc(), table.c.run_id)
                .offset(offset)
                .limit(limit)
            )
            .scalars()
            .all()
        )
    return list(ids), int(total)
