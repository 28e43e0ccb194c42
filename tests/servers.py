"""The service running on a loopback port, for clients that speak HTTP themselves (the openai client, a
browser): `running(app)` is the library's `in_background`."""

import time

import httpx

from vlp.serve.run import in_background as running


def wait_until_ready(url: str) -> None:
    """Polls /readyz of a server in another process for up to a minute."""
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} was not ready within a minute")


__all__ = ["running", "wait_until_ready"]
