"""`vlp serve`: the app under uvicorn. SIGTERM (or Ctrl-C) stops new requests (503) and lets the ones in
flight finish before the process ends."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from vlp.errors import ConfigError
from vlp.serve.app import create_app
from vlp.serve.batching import BatchSettings
from vlp.serve.command import ServeCommand, models_of
from vlp.serve.images import ImageLimits
from vlp.serve.service import ServeSettings


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.service.draining = True
        super().handle_exit(sig, frame)


def serve(command: ServeCommand) -> None:
    settings = ServeSettings(
        batch=BatchSettings(command.max_batch_size, command.max_wait_ms, command.max_queue),
        images=ImageLimits(command.max_image_bytes, command.max_image_pixels),
        max_body_bytes=command.max_body_bytes, timeout_s=command.timeout, device=command.device,
        precision=command.precision,
    )
    if not command.checkpoint and not command.index:
        raise ConfigError("vlp serve needs a model (--checkpoint NAME=DIR) or an index (--index NAME=DIR)")
    app = create_app(models_of(command.checkpoint), settings, indices=models_of(command.index, "--index"))
    logging.getLogger("vlp.serve.access").setLevel(logging.INFO)
    server = DrainingServer(uvicorn.Config(app, host=command.host, port=command.port, log_level="info",
                                           access_log=False, timeout_graceful_shutdown=command.timeout))
    server.run()


def wait_ready(url: str, *, alive: Callable[[], bool] = lambda: True, path: str = "/readyz",
               timeout_s: float = 120.0) -> None:
    """Polls `url + path` until it answers 200; an error when `alive()` turns false (the server ended) or the
    time is out."""
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"the service at {url} ended before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"the service at {url} was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def in_background(app: Any, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """`app` under uvicorn in a thread of this process until the block ends; yields its URL once it is ready
    (for a page's screenshot, and tests with clients that speak HTTP themselves)."""
    if port is None:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="vlp-serve", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)

