"""Running without TLS: keeping Twisted from importing pyOpenSSL and cryptography in a process
that will not use them."""

from __future__ import annotations

import sys


def skip_pyopenssl() -> None:
    """Make `import OpenSSL` fail from now on in this process, so that Twisted goes on without TLS.

    twisted.internet.tcp and posixbase import pyOpenSSL/cryptography eagerly when they can: ~70 ms
    of every deploy-client start, ~12 MB of RSS in every daemon. A None in sys.modules makes that
    import fail. Call it before the reactor is imported, and only when nothing will use TLS."""
    sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]
