"""`fbclip-edge serve`: a real Triton Inference Server on loopback, started once for the module
through the CLI; HTTP and gRPC answers equal the local runtime's; bad requests get their own
errors while good ones keep being answered; SIGTERM drains requests in flight (last test)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from fbclip_edge import FBClipError, create_model, save_model
from fbclip_edge.export import export_artifacts
from fbclip_edge.line.detector import Detector, Thresholds
from fbclip_edge.line.thresholds import calibrate_scores, write_calibration
from fbclip_edge.serve import OUTPUTS, Connection, Endpoint, RemoteBackend, pixels_model
from fbclip_edge.serve.client import RemoteDetector, same_size_runs
from fbclip_edge.serve.loadtest import (
    LoadConfig,
    LoadReport,
    describe_machine,
    machine_label,
    run_load,
    write_report,
)
from fbclip_edge.serve.server import (
    ServeConfig,
    Server,
    ServerProcess,
    check_frames,
    local_config,
    unavailable_reason,
)

SIZE = 56
MAX_SIDE = 256
REASON = unavailable_reason()
needs_server = pytest.mark.skipif(REASON is not None, reason=f"no Triton server here: {REASON}")
FRAME_SIZES = [(30, 44), (64, 20), (30, 44), (56, 56), (30, 44)]


def _frame(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


FRAMES = [_frame(h, w, seed) for seed, (h, w) in enumerate(FRAME_SIZES)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny export with a calibration whose thresholds split the test frames."""
    if REASON is not None:
        pytest.skip(f"no Triton server here: {REASON}")
    root = tmp_path_factory.mktemp("serve")
    save_model(create_model("tiny", image_size=SIZE, seed=5), root / "model")
    export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp32",
        targets="onnx",
        batch="1:4:8",
        parity_frames=[_frame(40, 40, 90)],
    )
    good = Detector.open(root / "artifacts", backend="onnxruntime").predict(FRAMES)
    scores = np.sort([d.image_score for d in good])
    calibration = calibrate_scores(scores, [d.anomaly_map for d in good], 0.3)
    # between the 3rd and 2nd highest score: two test frames anomalous, three not
    middle = float(scores[-3:-1].mean())
    write_calibration(root / "artifacts", replace(calibration, image_threshold=middle))
    return root / "artifacts"


@pytest.fixture(scope="module")
def spawned(artifacts, tmp_path_factory):
    """`fbclip-edge serve` in a child process; stopped (SIGTERM) at the end of the module."""
    config = local_config(artifacts, backend="onnxruntime", max_batch=8, max_frame_side=MAX_SIDE)
    process = ServerProcess(config, tmp_path_factory.mktemp("serve-log") / "serve.log").spawn()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local(artifacts, spawned):
    """The local runtime the server must agree with (computed while the server starts)."""
    detector = Detector.open(artifacts, backend="onnxruntime")
    return detector, detector.predict(FRAMES)


@pytest.fixture()
def server(spawned):
    if spawned.process.poll() is not None:
        pytest.fail("the module's server is gone (the SIGTERM test must stay last)")
    return spawned.wait_ready(timeout_s=120)


def _assert_same(got, expected, thresholds):
    """Scores and maps within 1e-5; decisions equal wherever they are not within 1e-5 of
    the threshold (a 1e-7 difference may flip a pixel sitting on it)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert abs(g.image_score - e.image_score) < 1e-5
        if abs(e.image_score - thresholds.image) > 1e-5:
            assert g.is_anomalous == e.is_anomalous
        assert g.anomaly_map.shape == e.anomaly_map.shape
        assert np.abs(g.anomaly_map - e.anomaly_map).max() < 1e-5
        clear = np.abs(e.anomaly_map - thresholds.pixel) > 1e-5
        assert np.array_equal(g.defect_mask[clear], e.defect_mask[clear])


# ---- no server needed -------------------------------------------------------------------


def test_endpoint_parsing_and_loopback():
    assert str(Endpoint.parse("http://127.0.0.1")) == "http://127.0.0.1:8000"
    assert Endpoint.parse("grpc://localhost").port == 8001
    assert Endpoint.parse("grpc://[::1]:9001").address == "[::1]:9001"
    assert Endpoint.parse("http://localhost:1").is_loopback
    assert not Endpoint.parse("http://192.0.2.7:8000").is_loopback
    for bad in ("https://host:8000", "host:8000", "http://host:8000/v2", "http://h:99999"):
        with pytest.raises(FBClipError, match="http://HOST:8000"):
            Endpoint.parse(bad)


def test_load_test_refuses_other_machines_and_unbounded_runs():
    with pytest.raises(FBClipError, match="loopback"):
        run_load(LoadConfig("http://192.0.2.7:8000"))
    with pytest.raises(FBClipError, match="requests one run may send"):
        LoadConfig("http://127.0.0.1:8000", clients=1000, frames=1000).check()
    assert machine_label("Intel(R) Xeon(R) Processor", 2) == "intel-xeon-2c"


def test_config_and_frame_checks_name_the_fix(tmp_path):
    with pytest.raises(FBClipError, match="must differ"):
        ServeConfig(tmp_path, http_port=9000, grpc_port=9000).check()
    with pytest.raises(FBClipError, match="--max-batch"):
        ServeConfig(tmp_path, max_batch=0).check()
    with pytest.raises(FBClipError, match="--max-frame-side"):
        check_frames(np.zeros((1, 300, 20, 3), np.uint8), 256)
    check_frames(np.zeros((1, 256, 20, 3), np.uint8), 256)
    runs = list(same_size_runs([np.zeros((2, 2, 3))] * 3 + [np.zeros((3, 2, 3))], limit=2))
    assert [len(run) for run in runs] == [2, 1, 1]


@needs_server
def test_a_busy_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FBClipError, match="--http-port"):
            Server(ServeConfig(tmp_path, http_port=port)).start()


# ---- against the server -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_frames_resized_on_the_server_match_the_local_runtime(server, local, protocol):
    detector, expected = local
    url = getattr(server.urls, protocol)
    with RemoteDetector.connect(url) as remote:
        assert remote.thresholds.image == detector.thresholds.image  # float64, exact
        assert remote.thresholds.calibrated
        got = remote.predict(FRAMES)
        streamed = list(remote.stream(iter(FRAMES), batch_size=2))
    _assert_same(got, expected, detector.thresholds)
    _assert_same(streamed, expected, detector.thresholds)
    assert {d.is_anomalous for d in expected} == {True, False}  # the thresholds matter


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_detector_open_url_runs_the_network_on_the_server(server, local, protocol):
    detector, expected = local
    remote = Detector.open(getattr(server.urls, protocol))
    assert type(remote) is Detector and isinstance(remote.backend, RemoteBackend)
    try:
        assert remote.image_size == SIZE and remote.thresholds == Thresholds(
            detector.thresholds.image, detector.thresholds.pixel, True
        )
        _assert_same(remote.predict(FRAMES), expected, detector.thresholds)
        pixels = np.random.default_rng(0).standard_normal((11, 3, SIZE, SIZE)).astype(np.float32)
        got = remote.backend.run(pixels)  # 11 frames: over the server's max batch, split
        want = [detector.backend.run(pixels[:8]), detector.backend.run(pixels[8:])]
        for index in range(2):
            expected_part = np.concatenate([part[index].numpy() for part in want])
            assert np.abs(got[index].numpy() - expected_part).max() < 1e-5
    finally:
        remote.backend.close()


def test_light_outputs_for_the_plant_network(server, local):
    detector, expected = local
    with RemoteDetector.connect(server.urls.grpc, maps="patch") as remote:
        _assert_same(remote.predict(FRAMES), expected, detector.thresholds)
    with RemoteDetector.connect(server.urls.http, maps="mask") as remote:
        masks = remote.predict(FRAMES)
    for got, want in zip(masks, expected, strict=True):
        assert got.anomaly_map.size == 0 and got.defect_mask.shape == want.defect_mask.shape
    connection = Connection(server.urls.http)
    out = connection.infer("fbclip", "frames", FRAMES[0][None], ["patch_map"])
    assert list(out) == ["patch_map"] and out["patch_map"].shape == (1, SIZE // 14, SIZE // 14)
    connection.close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.read().decode()


def test_health_readiness_statistics_and_prometheus_metrics(server):
    with RemoteDetector.connect(server.urls.http) as remote:
        remote.predict(FRAMES[0])
    assert _get(f"{server.urls.http}/v2/health/live")[0] == 200
    assert _get(f"{server.urls.http}/v2/health/ready")[0] == 200
    for model in ("fbclip", pixels_model("fbclip")):
        assert _get(f"{server.urls.http}/v2/models/{model}/ready")[0] == 200
    status, text = _get(server.urls.metrics)
    success = [
        line for line in text.splitlines() if line.startswith("nv_inference_request_success")
    ]
    counts = {line.split('model="')[1].split('"')[0]: float(line.split()[-1]) for line in success}
    assert counts["fbclip"] > 0 and "fbclip_pixels" in counts
    stats = json.loads(_get(f"{server.urls.http}/v2/models/fbclip/stats")[1])
    assert stats["model_stats"][0]["batch_stats"]


def test_bad_requests_get_their_errors_while_good_ones_are_answered(server, local):
    detector, expected = local
    stop = threading.Event()
    answered, failures = [], []

    def good_client():
        connection = Connection(server.urls.grpc)
        while not stop.is_set():
            try:
                out = connection.infer("fbclip", "frames", FRAMES[0][None], ["image_score"])
                answered.append(abs(float(out["image_score"][0, 0]) - expected[0].image_score))
            except FBClipError as error:
                failures.append(str(error))
        connection.close()

    def oversized(_):
        with RemoteDetector.connect(server.urls.http) as remote:
            with pytest.raises(FBClipError, match="--max-frame-side") as caught:
                remote.predict(_frame(MAX_SIDE + 1, 30, 0))
        return str(caught.value)

    frames = FRAMES[0][None]
    bad = {
        "data-type": ("fbclip", frames.astype(np.float32)),
        "unexpected shape": ("fbclip", np.zeros((1, 30, 44, 4), np.uint8)),
        "Expected [-1,-1,-1,3]": ("fbclip", np.zeros((2, 44, 3), np.uint8)),
        "batch-size must be": ("fbclip", np.repeat(frames, 9, axis=0)),
        "serves no model": ("nope", frames),
        "": ("fbclip", np.zeros((0, 30, 44, 3), np.uint8)),
    }
    workers = [threading.Thread(target=good_client) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for url in (server.urls.http, server.urls.grpc):
            connection = Connection(url)
            for expected_text, (model, array) in bad.items():
                with pytest.raises(FBClipError) as caught:
                    connection.infer(model, "frames", array, OUTPUTS)
                message = str(caught.value)
                assert "\n" not in message and expected_text in message, message
            connection.close()
        with ThreadPoolExecutor(4) as pool:  # refused together, and only they
            messages = list(pool.map(oversized, range(8)))
        assert all("\n" not in m and f"limit of {MAX_SIDE} px" in m for m in messages)
        with pytest.raises(FBClipError, match="serves no model"):
            RemoteDetector.connect(server.urls.http, model="nope")
        time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert not failures and len(answered) > 10 and max(answered) < 1e-5
    with RemoteDetector.connect(server.urls.grpc) as remote:
        _assert_same(remote.predict(FRAMES), expected, detector.thresholds)


def test_load_generator_reports_latency_and_the_batches_formed(server, tmp_path):
    config = LoadConfig(server.urls.grpc, clients=3, frames=4, frame_size=(40, 50), maps="patch")
    result = run_load(config, dynamic_batching=True)
    assert (result.sent, result.ok, result.errors) == (12, 12, 0)
    assert sum(size * count for size, count in result.batch_sizes.items()) >= 12
    assert 0 < result.p50_ms <= result.p99_ms and result.throughput_fps > 0
    report = LoadReport("2026-11-29T00:00:00+00:00", "test", describe_machine(), {}, {
        "clients": [3], "frames_per_client": 4, "frame_size": [40, 50], "maps": ["patch"],
        "outputs": {"patch": ["image_score"]}, "protocol": "grpc", "warmup_frames": 0,
    }, [result])  # fmt: skip
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["results"][0]["ok"] == 12
    assert "| on | patch | 3 | 12/12 | 0 |" in md_path.read_text()


def test_sigterm_answers_requests_in_flight_then_exits_cleanly(server):
    """Keep this test last: it stops the module's server."""
    frames = np.stack([_frame(120, 160, seed) for seed in range(8)])
    finished = []

    def client(_):
        connection = Connection(server.urls.http)
        out = connection.infer("fbclip", "frames", frames, ["image_score", "anomaly_map"])
        finished.append(time.monotonic())
        connection.close()
        return out["anomaly_map"].shape

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, k) for k in range(8)]
        deadline = time.monotonic() + 60
        while not finished and time.monotonic() < deadline:  # the others are queued by now
            time.sleep(0.01)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        results = [future.result(timeout=120) for future in futures]
    assert all(shape == (8, 120, 160) for shape in results)
    assert max(finished) > signalled, "every request was done before SIGTERM: nothing drained"
    assert server.process.wait(timeout=60) == 0
    assert "stopped after answering the requests in flight" in server.log.read_text()
    with pytest.raises(FBClipError, match="no Triton server answers"):
        Connection(server.urls.http).infer("fbclip", "frames", frames[:1], ["image_score"])
