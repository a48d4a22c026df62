"""Password hashing: argon2id on threads of its own, so the event loop stays free."""

import contextlib
import os
import secrets
from pathlib import Path

import anyio
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError

from core.settings import settings


def usable_cpus() -> int:
    """Its affinity, capped by a cgroup quota (not os.cpu_count(): the host's CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    # cgroup v2 (containers): "<quota> <period>", or "max <period>" for none
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        cpus = min(cpus, max(1, int(quota) // int(period)))
    return cpus


# argon2 takes ~0.1 s of CPU and 64 MiB per hash: leave a core to the event loop.
HASHING_THREADS = settings.PASSWORD_HASHING_THREADS or max(1, usable_cpus() - 1)
hashing_limiter = anyio.CapacityLimiter(HASHING_THREADS)
password_hash = PasswordHash.recommended()  # argon2id
# The most characters a password may have, new or checked: it bounds a hash's work.
MAX_LENGTH = 128
# Verified for unknown emails, so that they cost what a real account costs.
DUMMY_HASH = password_hash.hash(secrets.token_urlsafe())


def encoded(password: str) -> bytes:
    # Lone surrogates (a utf-7 form can carry them) get bytes no other text has.
    return password.encode("utf-8", "surrogatepass")


def hash_password(password: str) -> str:
    return password_hash.hash(encoded(password))


def verify_password(password: str, stored_hash: str) -> tuple[bool, str | None]:
    """Whether the password matches, and a new hash if the stored one is outdated."""
    try:
        return password_hash.verify_and_update(encoded(password), stored_hash)
    except UnknownHashError:  # not a hash this app wrote: nothing matches it
        return False, None
