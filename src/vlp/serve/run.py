"""`vlp serve`: the app under uvicorn. SIGTERM (or Ctrl-C) stops new requests (503) and lets the ones in
flight finish before the process ends."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def in_background(app: Any, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """`app` under uvicorn in a thread of this process until the block ends; yields its URL once it is ready
    (for a page's screenshot, and tests with clients that speak HTTP themselves)."""
    import httpx

    if port is None:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="vlp-serve", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        for _ in range(3000):  # a minute for the port and the models
            try:
                if thread.is_alive() and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive():
                raise RuntimeError(f"the service did not start on {url}")
            time.sleep(0.02)
        else:
            raise RuntimeError(f"the service on {url} was not ready within a minute")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)

