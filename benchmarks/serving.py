"""`vlp serve` under load, on 127.0.0.1 only: the drill (`make drills`) and the speed goals (a `make bench`
section). Never part of the tests.

    .venv/bin/python benchmarks/serving.py drill [--requests 10000] [--clients 16]
    .venv/bin/python benchmarks/serving.py bench [--requests 400] [--infinity PYTHON]

drill: 16 clients send `--requests` requests to a tiny CLIP, a fifth of them malformed (bad base64, a cut
JPEG, a 30,000 x 30,000 PNG, an empty text, a wrong field type, an unknown route, an oversized body). It
fails when any answer is a 5xx, when a malformed request's 4xx does not name its problem, or when the
server's memory (RSS) drifts more than 5% over the second half. Then requests/s and p50/p99 latency of the
good requests, with batching and with --max-batch-size 1, as a ratio.

bench: requests/s at 16 clients with batching against --max-batch-size 1 for CLIP image embedding (ViT-B/32
shapes, random weights) and BLIP captioning (the tiny config's shapes); one client's p50 against the same
call in process; and /v1/embeddings requests/s against infinity (`--infinity` names a Python where
infinity-emb is installed) or, without it, a plain FastAPI route that calls transformers one request at a
time, for the same weights (exported to a Hugging Face folder).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import random_pretrained
from vlp.checkpoint import save_checkpoint
from vlp.report import machine

SEED_IMAGES = [(200, 30, 30), (30, 30, 200), (30, 160, 60), (220, 200, 40)]


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), (235, 235, 235))
    image.paste(color, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def checkpoint(config: Path, folder: Path) -> Path:
    pretrained = random_pretrained(config, folder / "random")
    return save_checkpoint(folder / config.stem, family=pretrained.family, model_config=pretrained.config,
                           model=pretrained.model, assets=pretrained.assets)


class Server:
    """`vlp serve` in a subprocess on a free loopback port."""

    def __init__(self, models: dict[str, Path], *extra: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "vlp", "serve", "--port", str(self.port), *extra]
        for name, folder in models.items():
            command += ["--checkpoint", f"{name}={folder}"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.url, self.proc)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, path: str = "/readyz") -> None:
    """`vlp.serve.run.wait_ready` for a server in a subprocess."""
    from vlp.serve.run import wait_ready as wait

    wait(url, alive=lambda: proc.poll() is None, path=path)


def run_load(url: str, requests: list[tuple[str, Any, dict[str, str]]], clients: int,
             check: Callable[[int, dict[str, Any], Any], str | None] | None = None) -> dict[str, Any]:
    """Send `requests` ((path, JSON body or raw bytes, headers)) from `clients` threads; per request its
    status, latency and, through `check`, any problem with its answer."""
    results: list[tuple[int, float, str | None]] = [(0, 0.0, None)] * len(requests)
    cursor = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                path, body, headers = requests[index]
                start = time.perf_counter()
                if isinstance(body, bytes):
                    response = http.post(path, content=body, headers=headers)
                else:
                    response = http.post(path, json=body, headers=headers)
                elapsed = time.perf_counter() - start
                try:
                    answer = response.json()
                except json.JSONDecodeError:
                    answer = {"unparsed": response.text[:200]}
                problem = check(index, answer, response) if check else None
                results[index] = (response.status_code, elapsed, problem)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    wall = time.perf_counter() - start
    return {"results": results, "wall_s": wall}


def latency_summary(results: list[tuple[int, float, str | None]], wall: float) -> dict[str, float]:
    good = sorted(t for status, t, _ in results if status == 200)
    return {"requests_per_s": len(results) / wall, "p50_ms": 1000 * statistics.median(good),
            "p99_ms": 1000 * good[min(len(good) - 1, int(0.99 * len(good)))]}


def malformed_requests(max_body: int) -> list[tuple[tuple[str, Any, dict[str, str]], int, str]]:
    """(request, expected status, what the error must say) of each malformed kind."""
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, "PNG")
    return [
        (("/v1/embed", {"images": ["%%% not base64 %%%"]}, {}), 400, "not valid base64"),
        (("/v1/embed", {"images": [b64(jpeg.getvalue()[:300])]}, {}), 400, "not a readable image"),
        (("/v1/embed", {"images": [b64(bomb.getvalue())]}, {}), 413, "pixels"),
        (("/v1/embed", {"texts": [""]}, {}), 400, "empty text"),
        (("/v1/embed", {"texts": 7}, {}), 422, "texts"),
        (("/v1/classify", {"images": [], "labels": [1, 2]}, {}), 422, "labels"),
        (("/v1/nowhere", {"texts": ["a"]}, {}), 404, "no route"),
        (("/v1/embed", b'{"texts": ["' + b"a" * max_body + b'"]}', {"content-type": "application/json"}), 413,
         "over the limit"),
    ]


def drill(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="vlp-drill-"))
    clip = checkpoint(ROOT / "configs" / "clip-tiny.yaml", folder)
    max_body = 2**20
    images = [b64(png(c)) for c in SEED_IMAGES]
    texts = ["red", "a blue square", "two small green triangles beside a large red circle", "yes"]
    good = [("/v1/embed", {"texts": [texts[i % 4]]}, {}) if i % 3 else ("/v1/embed", {"images": [images[i % 4]]}, {})
            for i in range(8)] + [("/v1/classify", {"images": [images[0]], "labels": ["circle", "square"]}, {})]
    bad = malformed_requests(max_body)
    requests, expected = [], {}
    for index in range(args.requests):
        if index % 5 == 4:  # a fifth malformed, every kind in turn
            request, status, says = bad[(index // 5) % len(bad)]
            expected[index] = (status, says)
            requests.append(request)
        else:
            requests.append(good[index % len(good)])

    def check(index: int, answer: dict[str, Any], response: httpx.Response) -> str | None:
        if response.status_code >= 500:
            return f"{response.status_code}: {answer}"
        if index in expected:
            status, says = expected[index]
            message = (answer.get("error") or {}).get("message", "")
            if response.status_code != status or says not in message:
                return f"expected {status} saying {says!r}, got {response.status_code}: {message!r}"
        elif response.status_code != 200:
            return f"a good request got {response.status_code}: {answer}"
        return None

    server = Server({"clip": clip}, "--max-body-bytes", str(max_body))
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(server.rss_mib())
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome = run_load(server.url, requests, args.clients, check)
    finally:
        stop.set()
        sampler.join()
        server.stop()
    problems = [(i, p) for i, (_, _, p) in enumerate(outcome["results"]) if p]
    half = samples[len(samples) // 2 :] or samples
    drift = (max(half) - min(half)) / min(half)
    statuses: dict[str, int] = {}
    for status, _, _ in outcome["results"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    report = {"requests": args.requests, "clients": args.clients, "statuses": statuses,
              "problems": len(problems), "first_problems": problems[:5], "rss_mib_second_half": [min(half), max(half)],
              "rss_drift": drift, "wall_s": outcome["wall_s"]}
    # Speed of the good requests, batched and one item per call.
    goods = [r for i, r in enumerate(requests) if i not in expected][: args.speed_requests]
    for label, extra in (("batched", ()), ("batch_size_1", ("--max-batch-size", "1"))):
        server = Server({"clip": clip}, *extra)
        try:
            run_load(server.url, goods[:64], args.clients)  # warm-up
            measured = run_load(server.url, goods, args.clients)
        finally:
            server.stop()
        report[label] = latency_summary(measured["results"], measured["wall_s"])
    report["batched_over_batch_size_1"] = report["batched"]["requests_per_s"] / report["batch_size_1"]["requests_per_s"]
    report["passed"] = not problems and drift < 0.05
    return report


def _throughput(models: dict[str, Path], path: str, bodies: list[Any], clients: int, precision: str) -> dict[str, Any]:
    out = {}
    for label, extra in (("batched", ()), ("batch_size_1", ("--max-batch-size", "1"))):
        server = Server(models, "--precision", precision, *extra)
        try:
            run_load(server.url, [(path, b, {}) for b in bodies[: 2 * clients]], clients)
            measured = run_load(server.url, [(path, b, {}) for b in bodies], clients)
        finally:
            server.stop()
        out[label] = latency_summary(measured["results"], measured["wall_s"])
    out["ratio"] = out["batched"]["requests_per_s"] / out["batch_size_1"]["requests_per_s"]
    return out


PLAIN_TRANSFORMERS_APP = '''
import base64, io, sys, torch, transformers, uvicorn
from fastapi import FastAPI, Request
from PIL import Image
torch.set_num_threads({threads})
model = transformers.CLIPModel.from_pretrained(sys.argv[1]).eval()
processor = transformers.CLIPProcessor.from_pretrained(sys.argv[1])
app = FastAPI()
@app.get("/health")
def health():
    return {{}}
@app.post("/v1/embeddings")
async def embeddings(request: Request):
    body = await request.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["input"][0].split(",", 1)[1]))).convert("RGB")
    with torch.no_grad():
        vector = model.get_image_features(**processor(images=image, return_tensors="pt"))
    return {{"data": [{{"embedding": torch.nn.functional.normalize(vector, dim=-1)[0].tolist()}}]}}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def _peer_embeddings(python: str | None, hf_folder: Path, bodies: list[Any], clients: int,
                     precision: str) -> dict[str, Any]:
    """The same image embeddings from infinity (when `python` has it) or a plain transformers route."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if python:
        command = [str(Path(python).with_name("infinity_emb")), "v2", "--model-id", str(hf_folder), "--port", str(port),
                   "--device", "cpu", "--engine", "torch", "--url-prefix", "/v1", "--served-model-name", "clip",
                   "--dtype", "bfloat16" if precision == "bf16" else "float32"]
        name, health = "infinity", "/health"
    else:
        script = Path(tempfile.mkdtemp()) / "plain.py"
        script.write_text(PLAIN_TRANSFORMERS_APP.format(threads=os.cpu_count()))
        command = [sys.executable, str(script), str(hf_folder), str(port)]
        name, health = "plain FastAPI + transformers, one request at a time", "/health"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, health)
        body = [("/v1/embeddings", {**b, "model": "clip"}, {}) for b in bodies]
        first = httpx.post(url + "/v1/embeddings", json=body[0][1], timeout=120).json()["data"][0]["embedding"]
        run_load(url, body[: 2 * clients], clients)
        measured = run_load(url, body, clients)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"peer": name, "first_embedding": first, **latency_summary(measured["results"], measured["wall_s"])}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from vlp.convert import export_pretrained, load_pretrained
    from vlp.tasks import predict_functions

    folder = Path(tempfile.mkdtemp(prefix="vlp-bench-serve-"))
    config = folder / "clip-b32.yaml"
    config.write_text("model: {preset: clip-vit-b-32}\ntokenizer: {kind: bpe, vocab_size: 1024, context_length: 77}\n"
                      "image: {size: 224}\n")
    clip = checkpoint(config, folder)
    blip = checkpoint(ROOT / "configs" / "blip-tiny.yaml", folder)
    images = [b64(png(c, 224)) for c in SEED_IMAGES]
    report: dict[str, Any] = {"machine": machine(), "clients": args.clients, "requests": args.requests,
                              "precision": args.precision}
    embed = [{"model": "clip", "images": [images[i % 4]]} for i in range(args.requests)]
    report["clip_image_embedding"] = _throughput({"clip": clip}, "/v1/embed", embed, args.clients, args.precision)
    captions = [{"model": "blip", "images": [images[i % 4]], "generation": {"method": "greedy", "max_new_tokens": 20}}
                for i in range(args.requests // 2)]
    report["blip_captioning"] = _throughput({"blip": blip}, "/v1/caption", captions, args.clients, args.precision)

    # One client: the service's p50 against the same call in process.
    functions = predict_functions(load_pretrained(clip), device="cpu", precision=args.precision)
    picture = Image.open(io.BytesIO(base64.b64decode(images[0]))).convert("RGB")
    for _ in range(5):
        functions.embed_images([picture])
    timings = []
    for _ in range(50):
        start = time.perf_counter()
        functions.embed_images([picture])
        timings.append(time.perf_counter() - start)
    server = Server({"clip": clip}, "--precision", args.precision)
    try:
        run_load(server.url, [("/v1/embed", embed[0], {})] * 5, 1)
        single = run_load(server.url, [("/v1/embed", embed[0], {})] * 50, 1)
    finally:
        server.stop()
    in_process_ms = 1000 * statistics.median(timings)
    served_ms = latency_summary(single["results"], single["wall_s"])["p50_ms"]
    report["one_client"] = {"in_process_p50_ms": in_process_ms, "served_p50_ms": served_ms,
                            "max_wait_ms": 5.0, "overhead_ms": served_ms - in_process_ms}

    # /v1/embeddings against a peer serving the same weights.
    hf = export_pretrained(load_pretrained(clip), "hf", folder / "clip-hf", overwrite=True)
    uris = [{"input": [f"data:image/png;base64,{images[i % 4]}"], "modality": "image"} for i in range(args.requests)]
    server = Server({"clip": clip}, "--precision", args.precision)
    try:
        body = [("/v1/embeddings", {**u, "model": "clip"}, {}) for u in uris]
        run_load(server.url, body[: 2 * args.clients], args.clients)
        measured = run_load(server.url, body, args.clients)
        mine = httpx.post(server.url + "/v1/embeddings", json=body[0][1], timeout=120).json()["data"][0]["embedding"]
    finally:
        server.stop()
    ours = latency_summary(measured["results"], measured["wall_s"])
    peer = _peer_embeddings(args.infinity, hf, uris, args.clients, args.precision)
    theirs = peer.pop("first_embedding")
    report["embeddings_vs_peer"] = {"vlp": ours, "peer": peer,
                                    "ratio": ours["requests_per_s"] / peer["requests_per_s"],
                                    "same_vector_max_abs_diff": max(abs(a - b) for a, b in zip(mine, theirs, strict=True))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["drill", "bench"])
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--speed-requests", type=int, default=2000, help="good requests timed per arm (drill)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--infinity", help="a Python where infinity-emb is installed (bench)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both servers compute in this (bench; bf16 only where the CPU has it natively)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.requests = args.requests or (10_000 if args.what == "drill" else 400)
    report = drill(args) if args.what == "drill" else bench(args)
    suffix = "-bf16" if args.what == "bench" and args.precision == "bf16" else ""
    out = args.out or HERE / f"results-serving-{args.what}{suffix}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    if args.what == "drill" and not report["passed"]:
        raise SystemExit("the drill failed: see problems and rss_drift above")


if __name__ == "__main__":
    main()

