"""Serving on a real Triton Inference Server: the wire protocol both sides share, and the
network backend that `Detector.open("http://host:8000")` runs on.

A `fbclip-edge serve` server holds two models (KServe v2 over HTTP and gRPC):

- `fbclip`: uint8 frames (B, H, W, 3) of any size, resized on the server;
- `fbclip_pixels`: float32 pixels (B, 3, S, S), already preprocessed.

Both answer the outputs a request names (all when it names none): image_score (B, 1),
is_anomalous (B, 1), anomaly_map and defect_mask (B, H, W) at frame size, patch_map (B, g, g)
- the map on the network's patch grid: the downscaled map, 37 x 37 floats at 518 px, from
which `fbclip_edge.kernels.anomaly_map` rebuilds the full map exactly - and thresholds (B, 3,
float64): image threshold, pixel threshold, 1.0 when calibrated.

This package does not import `fbclip_edge.line`: `Detector.open` imports it, and the package
has no import cycles, lazy ones included. `fbclip_edge.serve.client.RemoteDetector` (resizing
and maps on the server) builds `Detection` objects on top of it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import torch

from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime import Backend, BackendInfo

MODEL = "fbclip"
FRAMES_INPUT = "frames"
PIXELS_INPUT = "pixels"
OUTPUTS = ("image_score", "is_anomalous", "anomaly_map", "defect_mask", "patch_map", "thresholds")
# Full-resolution maps: the outputs that cost the server a blur per frame and the network
# 5 bytes per pixel; a request that names none of them skips both.
MAP_OUTPUTS = frozenset({"anomaly_map", "defect_mask"})
# What a client asks for, by name: `full` is what a local Detector returns; `patch` sends the
# grid map only (the client rebuilds the full map); `mask` the decision pixels only.
OUTPUT_SETS: dict[str, tuple[str, ...]] = {
    "full": ("image_score", "is_anomalous", "anomaly_map", "defect_mask"),
    "patch": ("image_score", "is_anomalous", "patch_map"),
    "mask": ("image_score", "is_anomalous", "defect_mask"),
    "score": ("image_score", "is_anomalous"),
}
SIGMA = 4.0  # Gaussian blur of the server's maps, in frame pixels (the Detector default)
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
T = TypeVar("T")


def pixels_model(model: str) -> str:
    """Name of the pixels model served next to the frames model `model`."""
    return f"{model}_pixels"


@dataclass(frozen=True)
class Endpoint:
    """A server address: `http://host:8000` (KServe v2 HTTP) or `grpc://host:8001`."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """The endpoint of `url`, or a one-line error naming the accepted forms."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme not in DEFAULT_PORTS
            or not parts.hostname
            or parts.path not in ("", "/")
            or port == -1
        ):
            raise FBClipError(
                f"server address {url!r} must look like http://HOST:8000 or grpc://HOST:8001"
            )
        return cls(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])

    @property
    def address(self) -> str:
        """host:port as tritonclient takes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for localhost and loopback addresses (where load tests may go)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def _client_module(scheme: str) -> Any:
    """tritonclient.http or tritonclient.grpc, or the install hint."""
    try:
        if scheme == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise FBClipError(
            "tritonclient is not installed; pip install 'fbclip-edge[serve]' "
            "(or tritonclient[http,grpc])"
        ) from None
    return module


def _error_text(error: BaseException) -> str:
    """The server's message of a tritonclient error (str() of one adds status noise)."""
    message = getattr(error, "message", None)
    text = message() if callable(message) else None
    return str(text or error or type(error).__name__)


def explain(error: BaseException, endpoint: Endpoint, model: str) -> FBClipError:
    """A tritonclient or socket error as one line that says what to do."""
    text = re.sub(r"\[request id: [^\]]*\]\s*", "", _error_text(error))
    refused = re.search(r"FBClipError: ([^\n]+)", text)
    if refused:  # the server's own check, e.g. a frame over its size limit
        return FBClipError(f"{endpoint} refused the request: {refused.group(1)}")
    lowered = text.lower()
    if "unknown model" in lowered or ("model" in lowered and "not found" in lowered):
        return FBClipError(
            f"{endpoint} serves no model {model!r}; pass the name given to `fbclip-edge serve "
            f"--model-name` (default {MODEL!r})"
        )
    unreachable = ("connect", "unavailable", "connection", "refused", "reset", "closed")
    if isinstance(error, OSError) or any(word in lowered for word in unreachable):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return FBClipError(
            f"no Triton server answers at {endpoint} ({first[:160]}); start one with "
            "`fbclip-edge serve ARTIFACTS`, or check the address and that it is not stopping"
        )
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return FBClipError(f"{endpoint} answered an error: {(lines[-1] if lines else text)[:300]}")


class Connection:
    """One tritonclient (HTTP or gRPC) whose errors become one-line FBClipErrors.

    Not thread-safe (tritonclient.http is not): one Connection per thread.
    """

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.endpoint = Endpoint.parse(url)
        self.timeout_s = timeout_s
        self._module = _client_module(self.endpoint.scheme)
        if self.endpoint.scheme == "http":
            self._client = self._module.InferenceServerClient(
                self.endpoint.address, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            self._client = self._module.InferenceServerClient(self.endpoint.address)

    def _call(self, model: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except FBClipError:
            raise
        except Exception as error:  # tritonclient raises its own, socket and greenlet errors
            raise explain(error, self.endpoint, model) from None

    def infer(
        self, model: str, input_name: str, array: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One inference request; the named outputs as numpy arrays."""
        module = self._module
        datatype = module.np_to_triton_dtype(array.dtype)
        tensor = module.InferInput(input_name, list(array.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        requested = [module.InferRequestedOutput(name) for name in outputs]
        if self.endpoint.scheme == "grpc":
            timeout = {"client_timeout": self.timeout_s}
        else:
            timeout = {}
        result = self._call(
            model, self._client.infer, model, [tensor], outputs=requested, **timeout
        )
        return {name: result.as_numpy(name) for name in outputs}

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's configuration (KServe model-config endpoint) as a dict."""
        if self.endpoint.scheme == "grpc":
            config = self._call(model, self._client.get_model_config, model, as_json=True)
            return dict(config.get("config", config))
        return dict(self._call(model, self._client.get_model_config, model))

    def statistics(self, model: str) -> dict[str, Any]:
        """Triton's inference statistics of the model (with the batch sizes it formed)."""
        if self.endpoint.scheme == "grpc":
            return dict(
                self._call(model, self._client.get_inference_statistics, model, as_json=True)
            )
        return dict(self._call(model, self._client.get_inference_statistics, model))

    def close(self) -> None:
        """Close the client's sockets."""
        self._client.close()


def _dims(config: dict[str, Any], input_name: str) -> list[int]:
    """Dims of one input in a model config (JSON dims are strings in gRPC's form)."""
    for tensor in config.get("input", []):
        if tensor.get("name") == input_name:
            return [int(d) for d in tensor.get("dims", [])]
    raise FBClipError(f"the served model has no input {input_name!r}; is it a fbclip-edge server?")


class RemoteBackend(Backend):
    """The network of a `fbclip-edge serve` server as a runtime Backend: float32 pixels in,
    image_score and patch_map out (the `fbclip_pixels` model). A local `Detector` over it
    preprocesses and makes maps here exactly as over a local backend; only the network runs
    on the server, and pixels of every camera batch together there (they share one shape).

    `thresholds` are the server's (image, pixel, calibrated), fetched with one request.
    """

    def __init__(self, url: str, model: str = MODEL, timeout_s: float = 60.0) -> None:
        self.connection = Connection(url, timeout_s)
        self.model = model
        self.connection.model_config(model)  # names `model` in the error when it is not served
        config = self.connection.model_config(pixels_model(model))
        channels, size, _ = _dims(config, PIXELS_INPUT)
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.info = BackendInfo(
            "triton",
            str(self.connection.endpoint),
            "as served",
            size,
            {"url": str(self.connection.endpoint), "model": model, "max_batch": self.max_batch},
        )
        probe = np.zeros((1, channels, size, size), np.float32)
        values = self.connection.infer(pixels_model(model), PIXELS_INPUT, probe, ["thresholds"])
        image, pixel, calibrated = (float(v) for v in values["thresholds"][0])
        self.thresholds = (image, pixel, calibrated >= 0.5)

    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixel_values.detach().cpu().numpy()
        scores, patches = [], []
        for start in range(0, pixels.shape[0], self.max_batch):
            chunk = pixels[start : start + self.max_batch]
            out = self.connection.infer(
                pixels_model(self.model), PIXELS_INPUT, chunk, ["image_score", "patch_map"]
            )
            scores.append(out["image_score"][:, 0])
            patches.append(out["patch_map"][:, None])
        score = torch.from_numpy(np.concatenate(scores).astype(np.float32))
        return score, torch.from_numpy(np.concatenate(patches).astype(np.float32))

    def infer_frames(self, frames: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """uint8 frames (B, H, W, 3) of one size, B <= max_batch, on the frames model."""
        return self.connection.infer(self.model, FRAMES_INPUT, frames, outputs)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


__all__ = [
    "MAP_OUTPUTS",
    "MODEL",
    "OUTPUTS",
    "OUTPUT_SETS",
    "SIGMA",
    "Connection",
    "Endpoint",
    "RemoteBackend",
    "explain",
    "pixels_model",
]
