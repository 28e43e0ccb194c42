"""`vlp serve` on tiny random models: every route of every family answers as the task does in process,
concurrent requests are batched without changing an answer, the OpenAI client works against it, bad
requests get their 4xx, and readiness, metrics and shutdown behave."""

import base64
import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import free_port
from tiny_models import CONFIGS, random_pretrained
from vlp.config import read_mapping
from vlp.registry import parse_model_config
from vlp.serve import BatchSettings, ServeSettings, create_app
from vlp.serve.run import in_background as running
from vlp.serve.run import wait_ready as wait_until_ready
from vlp.tasks import TASKS, predict_functions

COLORS = [(200, 30, 30), (30, 30, 200), (30, 160, 60), (220, 200, 40)]


def _png(color, size=48) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (size, size), (235, 235, 235))
    image.paste(color, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image.save(out, "PNG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny random model per family."""
    folder = tmp_path_factory.mktemp("serve-models")
    out = {}
    for config in CONFIGS:
        family = parse_model_config(read_mapping(config)["model"])[0].name
        if family not in out:
            out[family] = random_pretrained(config, folder / family)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for index, color in enumerate(COLORS):
        path = folder / f"{index}.png"
        path.write_bytes(_png(color))
        paths.append(str(path))
    return paths


def _ready(client):
    for _ in range(600):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").json())


def _as_body(task, request, model):
    """A task's request as the JSON a client sends: its image files as base64."""
    body = dataclasses.asdict(request)
    encode = lambda v: [encode(x) for x in v] if isinstance(v, list) else _b64(Path(v).read_bytes())
    for field in dataclasses.fields(task.request):
        if field.metadata.get("image") and body.get(field.name) not in (None, [], ""):
            body[field.name] = encode(body[field.name])
    return {**body, "model": model}


def test_every_route_of_every_family_answers_as_the_task_does_in_process(models, files):
    app = create_app(models)
    with TestClient(app) as client:
        _ready(client)
        answered = set()
        for name, pretrained in models.items():
            for task in TASKS:
                if not (task.route and task.can(pretrained.family) and task.example_request):
                    continue
                request = task.example_request(files[:3])
                functions = predict_functions(pretrained, options=task.request_options(request), device="cpu")
                expected = json.loads(json.dumps(dataclasses.asdict(task.respond(functions, request))))
                response = client.post(f"/v1/{task.route}", json=_as_body(task, request, name))
                assert response.status_code == 200, (name, task.route, response.json())
                assert response.json() == expected, (name, task.route)
                answered.add(task.route)
        assert answered == {t.route for t in TASKS if t.route}
        docs = client.get("/openapi.json").json()
        assert {f"/v1/{t.route}" for t in TASKS if t.route} <= set(docs["paths"])


def test_concurrent_requests_are_batched_and_answer_as_single_ones(models, files):
    images = [_b64(Path(f).read_bytes()) for f in files]
    texts = ["red", "a blue square", "two small green triangles and one large red circle", "yes"] * 4
    bodies = [("embed", {"model": "clip", "texts": [texts[i]]}) for i in range(16)]
    bodies += [("embed", {"model": "clip", "images": [images[i % 4]]}) for i in range(16)]
    bodies += [("caption", {"model": "blip", "images": [images[i % 4]],
                            "generation": {"method": "greedy", "max_new_tokens": 6}}) for i in range(16)]
    bodies += [("detect", {"model": "owlvit", "images": [images[i % 4]], "queries": ["circle", "square"],
                           "threshold": 0.0, "top_k": 3}) for i in range(16)]
    alone = create_app(models, ServeSettings(batch=BatchSettings(max_batch_size=1)))
    batched = create_app(models, ServeSettings(batch=BatchSettings(max_batch_size=16, max_wait_ms=200)))
    with TestClient(alone) as one, TestClient(batched) as many:
        _ready(one)
        _ready(many)
        singles = [one.post(f"/v1/{route}", json=body).json() for route, body in bodies]
        with ThreadPoolExecutor(16) as pool:
            joined = list(pool.map(lambda rb: many.post(f"/v1/{rb[0]}", json=rb[1]).json(), bodies))
        metrics = many.get("/metrics").text
    for (route, _), single, together in zip(bodies, singles, joined, strict=True):
        if route == "embed":
            torch.testing.assert_close(torch.tensor(together["embeddings"]), torch.tensor(single["embeddings"]),
                                       atol=1e-5, rtol=0)
        elif route == "detect":
            for a, b in zip(together["detections"][0], single["detections"][0], strict=True):
                # Boxes are rounded to 0.01 px: a last-bit difference may cross a rounding boundary, no more.
                assert a["label"] == b["label"] and a["box"] == pytest.approx(b["box"], abs=0.0101)
        else:
            assert together == single
    # Calls were joined: the batch-size histogram saw more items than calls.
    counts = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("vlp_batch_items_") and 'model="clip"' in line and "bucket" not in line}
    assert counts["vlp_batch_items_sum"] > counts["vlp_batch_items_count"]


def _decompression_bomb() -> str:
    out = io.BytesIO()
    Image.new("1", (30000, 30000)).save(out, "PNG")
    return _b64(out.getvalue())


BAD = [
    ("/v1/embed", {"model": "clip", "images": ["not base64!"]}, 400, "images[0]: not valid base64"),
    ("/v1/embed", {"model": "clip", "images": [_b64(_png(COLORS[0])[:60])]}, 400, "images[0]: not a readable image"),
    ("/v1/embed", {"model": "clip", "images": ["https://example.com/a.png"]}, 400, "image URLs are not fetched"),
    ("/v1/embed", {"model": "clip", "images": ["/etc/passwd"]}, 400, "does not read file paths"),
    ("/v1/embed", {"model": "clip", "images": [_decompression_bomb()]}, 413, "over the limit"),
    ("/v1/embed", {"model": "clip", "texts": [""]}, 400, "texts[0]: empty text"),
    ("/v1/embed", {"model": "clip", "texts": "a red circle"}, 422, "field 'texts': expected a list"),
    ("/v1/embed", {"model": "clip", "texts": ["x" * 5000]}, 413, "texts[0]: 5,000 characters"),
    ("/v1/embed", {"model": "clip", "texts": ["a"] * 300}, 413, "texts: 300 entries"),
    ("/v1/embed", {"model": "nope", "texts": ["a"]}, 404, "no model 'nope'"),
    ("/v1/caption", {"model": "clip", "images": []}, 400, "cannot caption"),
    ("/v1/classify", {"model": "clip", "images": [], "labels": "x", "extra": 1}, 422, "unknown"),
    ("/v1/nothing", {}, 404, "no route POST /v1/nothing"),
]


def test_each_kind_of_malformed_request_gets_its_4xx_naming_the_problem(models):
    app = create_app({"clip": models["clip"], "blip": models["blip"]})
    with TestClient(app) as client:
        _ready(client)
        for path, body, status, says in BAD:
            response = client.post(path, json=body)
            assert response.status_code == status, (body, response.json())
            assert says in response.json()["error"]["message"], response.json()
        assert client.post("/v1/embed", content=b"{oops", headers={"content-type": "application/json"}
                           ).status_code == 400
        assert client.post("/v1/embed", content=b"[1, 2]").json()["error"]["message"].startswith(
            "the body must be a JSON object")
        huge = client.post("/v1/embed", content=b"x", headers={"content-length": str(2**40)})
        assert huge.status_code == 413
        assert client.get("/v1/embed").status_code == 405


def test_images_can_be_uploaded_as_multipart_files(models, files):
    app = create_app({"clip": models["clip"]})
    with TestClient(app) as client:
        _ready(client)
        data = Path(files[0]).read_bytes()
        form = client.post("/v1/embed", data={"request": json.dumps({"model": "clip"})},
                           files=[("images", ("a.png", data, "image/png"))])
        plain = client.post("/v1/embed", json={"model": "clip", "images": [_b64(data)]})
        assert form.status_code == 200 and form.json() == plain.json()


def test_readiness_waits_for_the_models_and_metrics_count_requests(models):
    app = create_app({"clip": models["clip"]}, load=False)
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 503
        app.state.service.load()
        assert client.get("/readyz").json()["models"] == {"clip": "clip"}
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'vlp_requests_total{route="/v1/embed",status="503"} 1.0' in metrics
    assert 'vlp_requests_total{route="/v1/embed",status="200"} 1.0' in metrics
    assert "vlp_request_duration_seconds_bucket" in metrics and "vlp_queue_depth" in metrics


@pytest.fixture(scope="module")
def server(models):
    """The service on a loopback port under uvicorn, for the clients that speak HTTP themselves."""
    with running(create_app({"clip": models["clip"], "instructblip": models["instructblip"]})) as url:
        yield url


def test_the_openai_client_embeds_and_chats_streaming_included(server, files):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"clip", "instructblip"}
    texts = client.embeddings.create(model="clip", input=["a red circle", "a blue square"])
    assert len(texts.data) == 2 and abs(sum(v * v for v in texts.data[0].embedding) - 1) < 1e-4
    uri = "data:image/png;base64," + _b64(Path(files[0]).read_bytes())
    images = client.embeddings.create(model="clip", input=[uri], extra_body={"modality": "image"}, dimensions=16)
    assert len(images.data[0].embedding) == 16
    messages = [{"role": "user", "content": [{"type": "text", "text": "what color is the square?"},
                                             {"type": "image_url", "image_url": {"url": uri}}]}]
    whole = client.chat.completions.create(model="instructblip", messages=messages, max_tokens=5, temperature=0)
    answer = whole.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(model="instructblip", messages=messages,
                                                                   max_tokens=5, temperature=0, stream=True))
    assert answer and streamed == answer
    with pytest.raises(openai.BadRequestError, match="cannot answer questions"):
        client.chat.completions.create(model="clip", messages=messages)


def test_sigterm_lets_the_request_in_flight_finish(models, tmp_path, files):
    from vlp.checkpoint import save_checkpoint

    clip = models["clip"]
    folder = save_checkpoint(tmp_path / "clip", family=clip.family, model_config=clip.config, model=clip.model,
                             assets=clip.assets)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlp", "serve", "--checkpoint", f"clip={folder}", "--port",
                             str(port), "--max-wait-ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        with ThreadPoolExecutor(2) as pool:
            # Two requests at once: their call waits 1.5 s for more to join, so both are in flight at SIGTERM.
            pending = [pool.submit(httpx.post, f"{url}/v1/embed", json={"texts": [text]}, timeout=30)
                       for text in ("a red circle", "a blue square")]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert [p.result().status_code for p in pending] == [200, 200]
        # uvicorn ends by re-raising the signal it handled, as a process killed by it would
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    log = proc.stdout.read().decode()
    assert '"path": "/v1/embed", "status": 200' in log


def test_a_full_queue_gets_429_and_a_late_request_is_dropped(models):
    # Another request in flight (held open here) makes each call wait max_wait_ms for company.
    slow = ServeSettings(batch=BatchSettings(max_wait_ms=400, max_queue=1))
    app = create_app({"clip": models["clip"]}, slow)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        _ready(client)
        with app.state.service.models["clip"].queue.request():
            first = pool.submit(client.post, "/v1/embed", json={"texts": ["red"]})
            time.sleep(0.1)
            second = client.post("/v1/embed", json={"texts": ["blue"]})
            assert first.result().status_code == 200
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert "requests waiting" in second.json()["error"]["message"]
    late = ServeSettings(batch=BatchSettings(max_wait_ms=300), timeout_s=0.1)
    app = create_app({"clip": models["clip"]}, late)
    with TestClient(app) as client:
        _ready(client)
        with app.state.service.models["clip"].queue.request():
            response = client.post("/v1/embed", json={"texts": ["red"]})
        assert response.status_code == 503 and "deadline passed" in response.json()["error"]["message"]


def test_only_the_tasks_the_loaded_models_can_do_have_routes(models):
    with TestClient(create_app({"clip": models["clip"]})) as client:
        _ready(client)
        paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/embed", "/v1/classify", "/v1/retrieve", "/v1/match"} <= paths
    assert "/v1/caption" not in paths and "/v1/detect" not in paths


def test_an_image_and_a_text_embed_together_with_weights(models, files):
    from vlp.tasks.embedding import EmbedRequest, embed

    functions = predict_functions(models["clip"], device="cpu")
    image_only = torch.tensor(embed(functions, EmbedRequest(images=files[:1])).embeddings)
    both = embed(functions, EmbedRequest(texts=["a red circle"], images=files[:1], weights=[1.0, 0.0])).embeddings
    torch.testing.assert_close(torch.tensor(both), torch.nn.functional.normalize(image_only, dim=-1))
    with TestClient(create_app({"clip": models["clip"]})) as client:
        _ready(client)
        image = _b64(Path(files[0]).read_bytes())
        mixed = client.post("/v1/embed", json={"images": [image], "texts": ["a red circle"], "weights": [0.5, 0.5]})
        assert mixed.status_code == 200 and len(mixed.json()["embeddings"]) == 1
        unweighted = client.post("/v1/embed", json={"images": [image], "texts": ["a red circle"]})
        assert unweighted.status_code == 400 and "give weights" in unweighted.json()["error"]["message"]


def test_the_predict_functions_kept_per_model_are_bounded(models):
    from vlp.serve.metrics import ServiceMetrics
    from vlp.serve.service import MAX_OPTION_SETS, ServedModel
    from vlp.tasks.captioning import CaptionPredictor

    model = ServedModel("blip", models["blip"], ServeSettings(), ServiceMetrics())
    try:
        for tokens in range(1, MAX_OPTION_SETS + 20):  # each request's own generation settings
            model.functions({CaptionPredictor: {"max_new_tokens": tokens}}, time.monotonic() + 60)
        assert len(model._functions) == MAX_OPTION_SETS
    finally:
        model.queue.close()
