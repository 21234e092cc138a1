"""The project's cryptography (keys, fingerprints, RSA-OAEP and AES-GCM sealing, signatures, secret files).

It lives in ``securechat.crypto_utils``; this module re-exports it for code that imports it from a checkout.
"""

from securechat.crypto_utils import *  # noqa: F403
