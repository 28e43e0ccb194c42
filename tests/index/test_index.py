"""`vlp index`: a collection embedded into faiss + SQLite, searched exactly under filters, paged and
de-duplicated, added to and removed from without a rebuild, resumed after a kill, and bad images named."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

import vlp
from tiny_models import CONFIGS, random_pretrained
from vlp.cli import main
from vlp.errors import BadQuery
from vlp.index import CollectionIndex
from vlp.index.build import add_to_index, build_index, remove_from_index
from vlp.index.command import query_vector
from vlp.index.vectors import build_faiss, choose_index
from vlp.tasks import predict_functions

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 60), "yellow": (230, 210, 40)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from vlp.checkpoint import save_checkpoint

    config = next(c for c in CONFIGS if c.stem == "clip-tiny")
    folder = tmp_path_factory.mktemp("index-clip")
    pretrained = random_pretrained(config, folder / "random")
    return save_checkpoint(folder / "clip", family=pretrained.family, model_config=pretrained.config,
                           model=pretrained.model, assets=pretrained.assets)


def _collection(folder, count=40, bad=()):
    """A CSV collection with metadata columns: shape, color, size (an integer)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        color = list(COLORS)[i % 4]
        path = folder / "images" / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not a png")
        else:
            image = Image.new("RGB", (48, 48), (235, 235, 235))
            image.paste(COLORS[color], (8 + i % 7, 8, 30 + i % 11, 30 + i % 5))
            image.save(path)
        rows.append({"filepath": f"images/{i:03d}.png", "title": f"a {color} {SHAPES[i % 3]}",
                     "shape": SHAPES[i % 3], "color": color, "size": str(10 + i)})
    with (folder / "collection.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "collection.csv"


def test_search_is_exact_under_filters_and_pages_and_dedups(clip, tmp_path):
    collection = _collection(tmp_path, bad=(5,))
    functions = predict_functions(vlp.load(clip), device="cpu")
    out = build_index(functions, collection, tmp_path / "index", checkpoint=str(clip), part_size=16, progress=False)
    index = CollectionIndex(out)
    manifest = index.manifest
    assert manifest["count"] == 39 and manifest["bad_images"] == 1 and "005.png" in manifest["bad_examples"][0]
    assert manifest["index"] == {"type": "Flat", "recall_at_10": 1.0}
    query = query_vector(functions, text="a red circle")
    everything = index.search(query, k=39)
    scores = [h.score for h in everything]
    assert scores == sorted(scores, reverse=True) and len({h.id for h in everything}) == 39
    # Filtered: the top k of the items that pass, exactly.
    passing = [h for h in everything if h.item["shape"] == "circle" and h.item["size"] >= 20]
    found = index.search(query, k=5, filters=("shape=circle", "size>=20"))
    assert [h.id for h in found] == [h.id for h in passing[:5]]
    assert [h.id for h in index.search(query, k=50, filters=("color in red,blue",))] == \
        [h.id for h in everything if h.item["color"] in ("red", "blue")]
    # Paging walks the same order.
    assert [h.id for h in index.search(query, k=5, offset=5)] == [h.id for h in everything[5:10]]
    # De-duplication at cosine 1 keeps all; at -1 only the best.
    assert len(index.search(query, k=39, dedup=1.01)) == 39
    assert [h.id for h in index.search(query, k=5, dedup=-1.0)] == [everything[0].id]
    with pytest.raises(BadQuery, match="no column 'weight'"):
        index.search(query, filters=("weight>3",))


def test_add_and_remove_without_a_rebuild(clip, tmp_path):
    collection = _collection(tmp_path, count=20)
    functions = predict_functions(vlp.load(clip), device="cpu")
    out = build_index(functions, collection, tmp_path / "index", checkpoint=str(clip), progress=False)
    more = _collection(tmp_path / "more", count=24)  # the same first 20 keys, and 4 new
    assert add_to_index(functions, out, more, progress=False) == 4
    index = CollectionIndex(out)
    assert index.manifest["count"] == 24 and len(index.ids) == 24
    query = query_vector(functions, text="a blue square")
    assert remove_from_index(out, filters=("color=blue",)) == 6
    index = CollectionIndex(out)
    assert all(h.item["color"] != "blue" for h in index.search(query, k=30)) and len(index.search(query, k=30)) == 18


def test_a_killed_build_resumes_to_the_same_index(clip, tmp_path):
    collection = _collection(tmp_path, count=40)
    functions = predict_functions(vlp.load(clip), device="cpu")
    straight = build_index(functions, collection, tmp_path / "straight", checkpoint=str(clip), part_size=8,
                           progress=False)

    class Killed(Exception):
        pass

    class DiesAfterTwoParts:
        calls = 0

        def require(self, name):
            def embed(images):
                DiesAfterTwoParts.calls += 1
                if DiesAfterTwoParts.calls > 2:
                    raise Killed
                return functions.embed_images(images)

            return embed

    with pytest.raises(Killed):
        build_index(DiesAfterTwoParts(), collection, tmp_path / "resumed", checkpoint=str(clip), part_size=8,
                    progress=False)
    assert len(list((tmp_path / "resumed" / "parts").glob("part-*.npz"))) == 2
    build_index(functions, collection, tmp_path / "resumed", checkpoint=str(clip), part_size=8, progress=False)
    a, b = CollectionIndex(straight), CollectionIndex(tmp_path / "resumed")
    assert np.array_equal(a.ids, b.ids) and np.allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-6)
    with pytest.raises(BadQuery, match="holds a built index already"):
        build_index(functions, collection, straight, checkpoint=str(clip), progress=False)


def test_large_collections_get_an_approximate_index_tuned_to_its_recall():
    assert choose_index(5_000, 64) == "Flat" and choose_index(50_000, 64) == "HNSW32"
    assert choose_index(10**8, 512).startswith("IVF")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, settings = build_faiss(vectors, np.arange(12_000, dtype=np.int64) * 3)
    assert settings["type"] == "HNSW32" and settings["recall_at_10"] >= 0.95 and settings["efSearch"] >= 16
    _, ids = index.search(vectors[:1], 1)
    assert ids[0, 0] == 0  # ids are the items', not positions


def test_the_command_line_builds_and_searches(clip, tmp_path, capsys):
    collection = _collection(tmp_path, count=12, bad=(3,))
    out = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(clip), "--images", str(collection), "--out", str(out)]) == 0
    assert "index of 11 images" in capsys.readouterr().out
    assert main(["index", "search", str(out), "--text", "a red circle", "--k", "3", "--filter", "shape=circle",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["shape"] == "circle" for h in hits)
    image = tmp_path / "images" / "000.png"
    assert main(["index", "search", str(out), "--image", str(image), "--text", "red", "--weights", "0.7", "0.3"]) == 0
    assert main(["index", "search", str(out), "--text", "x", "--filter", "nope=1"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["index", "remove", str(out), "--key", "images/000.png"]) == 0
    assert "1 items removed" in capsys.readouterr().out


def test_the_service_searches_its_indices_and_serves_their_images(clip, tmp_path):
    from fastapi.testclient import TestClient

    from vlp.serve import create_app

    collection = _collection(tmp_path, count=20)
    functions = predict_functions(vlp.load(clip), device="cpu")
    out = build_index(functions, collection, tmp_path / "index", checkpoint=str(clip), progress=False)
    offline = CollectionIndex(out).search(query_vector(functions, text="a red circle"), k=5, filters=("shape=circle",))
    with TestClient(create_app({"clip": str(clip)}, indices={"shapes": str(out)})) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
        found = client.post("/v1/search", json={"text": "a red circle", "k": 5, "filter": ["shape=circle"]}).json()
        assert [r["id"] for r in found["results"]] == [h.id for h in offline]
        assert all(r["shape"] == "circle" for r in found["results"])
        image = client.get(f"/v1/indices/shapes/items/{found['results'][0]['id']}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert client.get("/v1/indices").json()["shapes"]["model"] == "clip"
        bad = client.post("/v1/search", json={"text": "x", "filter": ["nope=1"]})
        assert bad.status_code == 400 and "no column 'nope'" in bad.json()["error"]["message"]
        assert client.post("/v1/search", json={"index": "other", "text": "x"}).status_code == 404
        assert client.get("/v1/indices/shapes/items/999/image").status_code == 404


def test_a_build_on_two_processes_equals_one_on_one(clip, tmp_path):
    import os
    import subprocess
    import sys

    collection = _collection(tmp_path, count=30, bad=(7,))
    args = ["index", "build", "--checkpoint", str(clip), "--images", str(collection), "--part-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vlp", *args, "--out", str(tmp_path / "one")], check=False, env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vlp", *args, "--out", str(tmp_path / "two")], check=False, env=env,
                         capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = CollectionIndex(tmp_path / "one"), CollectionIndex(tmp_path / "two")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert a.manifest["bad_images"] == b.manifest["bad_images"] == 1
    assert a.metadata.rows(a.ids.tolist()) == b.metadata.rows(b.ids.tolist())


def test_webdataset_shards_are_a_collection_too(clip, shapes_world, tmp_path):
    from fastapi.testclient import TestClient

    from vlp.serve import create_app

    shards = str(shapes_world / "shards" / "web-{000000..000003}.tar")
    functions = predict_functions(vlp.load(clip), device="cpu")
    out = build_index(functions, shards, tmp_path / "index", checkpoint=str(clip), progress=False)
    index = CollectionIndex(out)
    assert index.manifest["count"] == 100
    hit = index.search(query_vector(functions, text="a red circle"), k=1)[0]
    assert "#" in hit.item["path"] and hit.item["caption"]
    with TestClient(create_app({"clip": str(clip)}, indices={"web": str(out)})) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
        image = client.get(f"/v1/indices/web/items/{hit.id}/image")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_a_csv_with_bytes_that_are_not_utf8_is_indexed_with_replacement_characters(clip, tmp_path):
    _collection(tmp_path, count=4)
    (tmp_path / "odd.csv").write_bytes(b"filepath,title,place\nimages/000.png,a red circle,caf\xe9\n"
                                       b"images/001.png,a blue square,home\n")
    functions = predict_functions(vlp.load(clip), device="cpu")
    out = build_index(functions, tmp_path / "odd.csv", tmp_path / "index", checkpoint=str(clip), progress=False)
    rows = CollectionIndex(out).metadata.rows([0, 1])
    assert rows[0]["place"] == "caf\ufffd" and rows[1]["place"] == "home"
