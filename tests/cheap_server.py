"""main.app with cheap argon2, served by `uvicorn cheap_server:app --app-dir tests`: the
fuzzer's server signs up and logs in hundreds of times (~6 s of CPU at full strength).
Every other server process runs `uvicorn main:app` and hashes as deployed.
"""

from cheap_hashing import CHEAP_DUMMY_HASH, CHEAP_HASH

import main
from accounts import passwords

passwords.password_hash = CHEAP_HASH
passwords.DUMMY_HASH = CHEAP_DUMMY_HASH
app = main.app
