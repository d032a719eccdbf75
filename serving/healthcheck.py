"""``python -m serving.healthcheck``: exit 0 when the local API answers /healthz (Docker HEALTHCHECK).

Reads the port from BOXTEACHER_PORT (default 8000); stdlib only, so it is cheap to run.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("BOXTEACHER_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:  # noqa: S310 - fixed local URL
            return 0 if response.status == 200 else 1
    except OSError as err:
        print(f"healthcheck failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
