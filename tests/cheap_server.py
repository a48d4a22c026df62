"""main.app with cheap argon2, served by `uvicorn cheap_server:app --app-dir tests`, for
servers that sign up and log in hundreds of times where hashing is not the subject: the
fuzzer's, the password-guessing tests'. Every other server process runs `uvicorn
main:app` and hashes as deployed.
"""

from cheap_hashing import CHEAP_DUMMY_HASH, CHEAP_HASH

import main
from accounts import passwords

passwords.password_hash = CHEAP_HASH
passwords.DUMMY_HASH = CHEAP_DUMMY_HASH
app = main.app
