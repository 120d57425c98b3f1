"""The image's health check: ``python -m packager_server.health`` exits 0 when the server
in this container answers ``/ready`` with 200, else 1.

It finds the port as the server does (the platforms' variables, then ``PACKAGER_PORT``,
then 8080: :data:`packager_server.config.PORT_VARIABLES`), so a container started with
``PORT`` or ``AIP_HTTP_PORT`` set is not reported unhealthy for being probed on 8080.
Standard library only, and no MLflow import: the engine runs it every few seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from packager_server.config import PORT_VARIABLES

DEFAULT_PORT = 8080
TIMEOUT_SECONDS = 2.0


def port(env: dict[str, str] | os._Environ[str] = os.environ) -> int:
    for name in PORT_VARIABLES:
        value = env.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return DEFAULT_PORT


def main() -> int:
    url = f"http://127.0.0.1:{port()}/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except OSError as err:  # refused, 503 (HTTPError), timeout
        print(f"{url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
