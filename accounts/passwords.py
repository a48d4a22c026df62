"""Password hashing: argon2id on threads of its own, so the event loop stays free."""

import os
import secrets
from pathlib import Path

import anyio
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError

from core.settings import settings


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup quota.

    Not os.cpu_count(), which counts the host's CPUs inside a container.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:  # cgroup v2 (containers): "<quota> <period>", or "max <period>" for none
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
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
    """The password as argon2 takes it: UTF-8, and any text at all.

    A form whose charset is utf-7 or unicode_escape can carry lone surrogates, which
    plain UTF-8 cannot encode; "surrogatepass" gives them bytes no other text has, and
    is plain UTF-8 for all other text, so hashes made from `str` still verify.
    """
    return password.encode("utf-8", "surrogatepass")


def hash_password(password: str) -> str:
    return password_hash.hash(encoded(password))


def verify_password(password: str, stored_hash: str) -> tuple[bool, str | None]:
    """Whether the password matches, and a new hash if the stored one is outdated."""
    try:
        return password_hash.verify_and_update(encoded(password), stored_hash)
    except UnknownHashError:  # not a hash this app wrote: nothing matches it
        return False, None
