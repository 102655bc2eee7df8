"""``headstart serve`` as a user runs it: a real server process on a free loopback port, a real HTTP client.

Real photos from ../shared/data/ants_bees_train when present (else images made in code): predictions
equal ``headstart predict``'s, 200 concurrent requests all succeed (p50/p99 printed), bad uploads get
4xx JSON errors while the server keeps serving, and Ctrl-C stops it cleanly. The server also stops by
itself after 120 s without a request ($HEADSTART_SERVE_IDLE_EXIT), whatever happens to this process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ANTS_BEES, make_tree
from PIL import Image

import headstart
from headstart.predictor import PREDICT_TOLERANCE

httpx = pytest.importorskip("httpx", reason="pip install 'headstart[test]'")
pytest.importorskip("fastapi", reason="pip install 'headstart[serve]'")
from headstart.serve import Batcher, latency_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, CHECK_PER_CLASS = 12, 4
CONCURRENT, IN_FLIGHT = 200, 16


def _photos() -> dict[str, list[Path]]:
    """Photos by class: real ones when ../shared is present, else small images made in code."""
    if ANTS_BEES.is_dir():
        return {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
                for c in sorted(ANTS_BEES.iterdir()) if c.is_dir()}
    return {}


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A run trained on a few photos per class, the cache it used, and photos it has not seen."""
    root = tmp_path_factory.mktemp("serve")
    photos = _photos()
    if photos:
        for name, files in photos.items():
            (root / "data" / name).mkdir(parents=True)
            for file in files[:TRAIN_PER_CLASS]:
                shutil.copy(file, root / "data" / name / file.name)
        unseen = [f for files in photos.values() for f in files[TRAIN_PER_CLASS:TRAIN_PER_CLASS + CHECK_PER_CLASS]]
    else:
        make_tree(root / "data", per_class=TRAIN_PER_CLASS)
        unseen = sorted(make_tree(root / "unseen", per_class=CHECK_PER_CLASS).rglob("*.png"))
    cache = root / "cache"
    headstart.train(root / "data", root / "run", select="none", cache_dir=cache, progress=False)
    return root / "run", cache, unseen


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    """``headstart serve`` in its own process; stopped with Ctrl-C (SIGINT) at the end, which must be clean."""
    run, cache, _ = served_run
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    port = _free_port()
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache), "HEADSTART_SERVE_IDLE_EXIT": "120",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as sink:
        command = [sys.executable, "-m", "headstart", "serve", str(run), "--port", str(port), "--max-wait-ms", "10",
                   "--max-batch", "8"]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        yield url, log
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0, log.read_text()[-2000:]
        assert "headstart serve: stopped" in log.read_text()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server did not answer /health within {timeout:.0f} s: {log.read_text()[-2000:]}")


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, trust_env=False)


def test_predictions_equal_headstart_predict(server, served_run):
    url, _ = server
    run, cache, unseen = served_run
    expected = headstart.predict(run, unseen, top_k=2, cache_dir=cache, progress=False)
    assert len(expected["predictions"]) == len(unseen)
    worst = 0.0
    with _client(url) as client:
        for item in expected["predictions"]:
            path = Path(item["path"])
            response = client.post("/predict", params={"top_k": 2}, files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, response.text
            got = response.json()
            assert got["label"] == item["label"] and got["file"] == path.name
            served, predicted = dict(got["top_k"]), dict(item["top_k"])
            worst = max(worst, max(abs(served[c] - predicted[c]) for c in predicted))
        raw = client.post("/predict", content=Path(unseen[0]).read_bytes())  # the raw body works too
        assert raw.json()["label"] == expected["predictions"][0]["label"]
    assert worst <= PREDICT_TOLERANCE
    print(f"serve vs predict on {len(unseen)} images: top-1 identical, max |p_serve - p_predict| = {worst:.2e}")


def test_concurrent_requests_all_succeed(server, served_run, capsys):
    url, _ = server
    images = [p.read_bytes() for p in served_run[2]]
    with _client(url) as client:
        labels = [client.post("/predict", content=data).json()["label"] for data in images]

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> tuple[int, str, float]:
        async with gate:
            start = time.perf_counter()
            response = await client.post("/predict", content=images[i % len(images)])
            ms = 1000 * (time.perf_counter() - start)
            return response.status_code, response.json().get("label", response.text), ms

    async def burst() -> tuple[list[tuple[int, str, float]], float]:
        gate = asyncio.Semaphore(IN_FLIGHT)
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(client, gate, i) for i in range(CONCURRENT)))
            return results, time.perf_counter() - start

    results, seconds = asyncio.run(burst())
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    assert [r[1] for r in results] == [labels[i % len(images)] for i in range(CONCURRENT)]
    health = httpx.get(f"{url}/health", trust_env=False).json()
    assert health["largest_batch"] > 1  # concurrent requests were batched
    lat = latency_summary([r[2] for r in results])
    with capsys.disabled():
        print(f"\n{CONCURRENT} requests, {IN_FLIGHT} in flight: {CONCURRENT / seconds:.1f} req/s, "
              f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, largest batch {health['largest_batch']}, "
              f"mean {health['mean_batch']}")


def png_bomb(side: int = 30000) -> bytes:
    """A PNG whose header says ``side x side`` RGB (2.7 GB decoded) but which is a few KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (side * 3 + 1) * 16, 9)  # the first rows; the header is what is checked
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _truncated_jpeg(served_run) -> bytes:
    buffer = io.BytesIO()
    Image.open(served_run[2][0]).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_bad_uploads_get_json_errors_and_the_server_goes_on(server, served_run):
    url, _ = server
    good = served_run[2][0].read_bytes()
    bomb = png_bomb()
    assert len(bomb) < 100_000
    cases = {
        "zero bytes": ({"files": {"file": ("empty.jpg", b"")}}, {400}),
        "text file": ({"files": {"file": ("notes.txt", b"just some words\n" * 20)}}, {422}),
        "truncated JPEG": ({"files": {"file": ("cut.jpg", _truncated_jpeg(served_run))}}, {422}),
        "30000 x 30000 PNG": ({"files": {"file": ("bomb.png", bomb)}}, {413, 422}),
        "body over --max-bytes": ({"content": b"\xff" * (20 * 2**20 + 1)}, {413}),
        "no file part": ({"content": b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n',
                          "headers": {"content-type": "multipart/form-data; boundary=b"}}, {400}),
        "a form, not an image": ({"data": {"note": "no image"}}, {415}),
        "bad top_k": ({"content": good, "params": {"top_k": 0}}, {422}),
    }
    with _client(url) as client:
        for name, (request, statuses) in cases.items():
            response = client.post("/predict", **request)
            assert response.status_code in statuses, (name, response.status_code, response.text)
            error = response.json()["error"]
            assert isinstance(error, str) and error, name
            assert client.get("/health").json()["status"] == "ok", name
            assert client.post("/predict", content=good).status_code == 200, name  # still serving
        assert "image too large" in client.post("/predict", files={"file": ("bomb.png", bomb)}).json()["error"]


def test_health_and_metadata(server, served_run):
    url, log = server
    with _client(url) as client:
        health = client.get("/health").json()
        meta = client.get("/metadata").json()
    assert health["status"] == "ok" and health["engine"] == "torch"
    assert meta["classes"] == headstart.load_run(served_run[0]).class_names
    assert meta["model_card"]["classes"] == meta["classes"] and meta["limits"]["max_bytes"] == 20 * 2**20
    assert str(served_run[0].parent) not in str(meta)  # no path of this machine in what the server tells
    lines = [line for line in log.read_text().splitlines() if " /health " in line or " /metadata " in line]
    assert lines and all(line.split()[-2] == "ms" or line.endswith(" ms") for line in lines)


def test_batcher_batches_and_loses_nothing():
    """Unit: 50 submissions at once, batches of at most 8; each gets its own row back."""
    sizes = []

    def score(batch):
        sizes.append(len(batch))
        time.sleep(0.005)
        return np.asarray([[float(item), 1.0 - float(item)] for item in batch])

    async def main():
        batcher = Batcher(score, max_batch=8, max_wait_s=0.002)
        batcher.start()
        try:
            rows = await asyncio.gather(*(batcher.submit(i / 100) for i in range(50)))
            late = await batcher.submit(0.5)  # after a quiet spell: served alone, after its wait
        finally:
            await batcher.stop()
        return rows, late

    rows, late = asyncio.run(main())
    assert [row[0] for row in rows] == [i / 100 for i in range(50)]
    assert late[0] == 0.5 and max(sizes) <= 8 and sum(sizes) == 51 and len(sizes) < 51

    async def alone():  # nothing else on the way: scored at once, not after max_wait
        batcher = Batcher(score, max_batch=8, max_wait_s=5.0, on_the_way=lambda: 0)
        batcher.start()
        try:
            start = time.perf_counter()
            await batcher.submit(0.25)
            return time.perf_counter() - start
        finally:
            await batcher.stop()

    assert asyncio.run(alone()) < 2.0


def _tiny_graph(path: Path, classes: list[str], spec: dict) -> Path:
    """An ONNX graph with the exported graphs' interface: uint8 N x 3 x H x W -> softmax(mean colour @ W)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = np.array([[1.0, -1.0], [0.0, 0.5], [-1.0, 1.0]], dtype=np.float32) / 50
    h, w = spec["size"]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 3, h, w])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"headstart.classes": json.dumps(classes), "headstart.input": json.dumps(spec)})
    onnx.save(model, str(path))
    return path


def test_onnx_engine_feeds_the_graph_the_reference_preprocessing(served_run, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_input = pytest.importorskip("headstart.onnx_input")
    from headstart.data import ImageDecodeError
    from headstart.predictor import Predictor

    run = headstart.load_run(served_run[0])
    spec = onnx_input.input_spec(run.info["data_config"])
    graph = _tiny_graph(tmp_path / "tiny.onnx", run.class_names, spec)
    predictor = Predictor.load(run, engine="onnx", onnx_path=graph)
    photo = served_run[2][0]
    got = predictor.predict_bytes([photo.read_bytes()])
    x = onnx_input.prepare_image(photo, spec).astype(np.float64).mean(axis=(1, 2)) @ (
        np.array([[1.0, -1.0], [0.0, 0.5], [-1.0, 1.0]]) / 50)
    expected = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert np.allclose(got[0], expected, atol=1e-6)
    with pytest.raises(ImageDecodeError, match="image too large"):
        predictor.prepare(png_bomb(), "bomb.png")
    with pytest.raises(headstart.UsageError, match="predicts the classes"):
        Predictor.load(run, engine="onnx", onnx_path=_tiny_graph(tmp_path / "other.onnx", ["x", "y"], spec))
    with pytest.raises(headstart.UsageError, match="headstart export"):
        Predictor.load(run, engine="onnx", onnx_path=tmp_path / "missing.onnx")


def test_forward_sizes_are_few_and_warmed_up():
    from headstart.predictor import forward_sizes

    assert forward_sizes(13, 32) == [8, 4, 1] and forward_sizes(70, 32) == [32, 32, 4, 2]
    assert forward_sizes(40, 24) == [24, 16] and forward_sizes(0, 8) == []
    for max_batch in (1, 3, 8, 24, 32):
        used = {size for n in range(1, 3 * max_batch) for size in forward_sizes(n, max_batch)}
        assert used == {min(max_batch, 1 << k) for k in range(max_batch.bit_length() + 1)}  # what warm_up runs
