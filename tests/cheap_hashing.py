"""argon2 at the cheapest setting it allows, for tests where hashing is not the subject:
the app's real setting costs ~0.13 s of CPU a hash, which was most of the suite's time.
"""

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

CHEAP_HASH = PasswordHash([Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1)])
CHEAP_DUMMY_HASH = CHEAP_HASH.hash("dummy")
