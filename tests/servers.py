"""The service running on a loopback port, for clients that speak HTTP themselves (the openai client, a
browser)."""

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx

from conftest import free_port


def wait_until_ready(url: str) -> None:
    """Polls /readyz of a server for up to a minute."""
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} was not ready within a minute")


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """`app` under uvicorn in a thread, ready; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(3000):  # up to a minute for uvicorn to bind its port
        if server.started or not thread.is_alive():
            break
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_until_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
