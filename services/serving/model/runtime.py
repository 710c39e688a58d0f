"""Runtime of the tissue detector (or any single-session ONNX model) over onnxruntime (CPU).

:class:`TissueDetector` loads a model from bytes (as fetched from object storage), describes
its tensors in Open Inference Protocol (KServe v2) terms, and runs inference. All methods are
synchronous CPU work: call them from a thread or process pool. ``InferenceSession.run`` is
thread-safe, so one detector may serve concurrent requests.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from PIL import Image

from .graph import FRACTION_OUTPUT, INPUT_NAME, MASK_OUTPUT

# onnxruntime type strings -> KServe v2 datatypes -> numpy dtypes
ORT_TO_KSERVE: Final = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
KSERVE_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DEFAULT_MAX_ELEMENTS: Final = 3 * 8192 * 8192  # one 8192 x 8192 RGB image
PLATFORM: Final = "onnxruntime_onnx"


class InferenceInputError(ValueError):
    """Request tensors do not match the model (maps to INVALID_ARGUMENT)."""


class ModelLoadError(ValueError):
    """The model bytes are not a loadable ONNX model."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 naming: "FP32", "UINT8", ...
    shape: tuple[int, ...]  # -1 for a dynamic dimension

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class TissueResult:
    fraction: float
    mask: np.ndarray  # uint8 H x W, 1 = tissue


def _spec(arg: Any) -> TensorSpec:
    datatype = ORT_TO_KSERVE.get(str(arg.type))
    if datatype is None:
        raise ModelLoadError(f"unsupported tensor type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(str(arg.name), datatype, shape)


class TissueDetector:
    """An ONNX model behind onnxruntime's CPU provider."""

    def __init__(
        self,
        model_bytes: bytes,
        *,
        intra_op_threads: int = 0,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        """``intra_op_threads``: 0 lets onnxruntime decide. ``max_elements``: upper bound on
        the element count of any request tensor (guards memory)."""
        if not isinstance(model_bytes, bytes | bytearray | memoryview) or not model_bytes:
            raise ModelLoadError("model bytes required")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                bytes(model_bytes), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail/InvalidGraph/... classes
            raise ModelLoadError(f"cannot load ONNX model: {type(exc).__name__}") from None
        self._inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self._outputs = tuple(_spec(a) for a in self._session.get_outputs())
        meta = self._session.get_modelmeta()
        props = dict(meta.custom_metadata_map or {})
        self.name: str = props.get("name") or str(meta.graph_name or "model")
        self.version: str = props.get("version") or str(meta.version or "1")
        self.properties: dict[str, str] = props
        self._max_elements = max_elements

    @classmethod
    def from_path(cls, path: str, **kwargs: Any) -> TissueDetector:
        with open(path, "rb") as handle:
            return cls(handle.read(), **kwargs)

    # -------------------------------------------------------------- metadata
    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def metadata(self) -> dict[str, Any]:
        """KServe v2 ``ModelMetadataResponse`` fields: name, versions, platform, inputs,
        outputs (each ``{"name", "datatype", "shape"}`` with -1 for dynamic dimensions)."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [spec.as_dict() for spec in self._inputs],
            "outputs": [spec.as_dict() for spec in self._outputs],
        }

    # ------------------------------------------------------------- inference
    def raw_infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on named tensors, checked strictly against :meth:`metadata` (names,
        datatypes, ranks, fixed dimensions, size). Returns the requested outputs (default all)."""
        expected = {spec.name: spec for spec in self._inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise InferenceInputError(f"unknown input tensor(s): {', '.join(unknown)}")
        missing = sorted(set(expected) - set(inputs))
        if missing:
            raise InferenceInputError(f"missing input tensor(s): {', '.join(missing)}")
        feed: dict[str, np.ndarray] = {}
        for name, spec in expected.items():
            array = inputs[name]
            if not isinstance(array, np.ndarray):
                raise InferenceInputError(f"input {name} must be a numpy array")
            if array.dtype != KSERVE_TO_NUMPY[spec.datatype]:
                raise InferenceInputError(
                    f"input {name} must be {spec.datatype}, got {array.dtype.name}"
                )
            if array.ndim != len(spec.shape):
                raise InferenceInputError(f"input {name} must have rank {len(spec.shape)}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
                if want >= 0 and got != want:
                    raise InferenceInputError(
                        f"input {name} dimension {axis} must be {want}, got {got}"
                    )
                if got < 1:
                    raise InferenceInputError(f"input {name} has an empty dimension")
            if math.prod(array.shape) > self._max_elements:
                raise InferenceInputError(f"input {name} is too large")
            feed[name] = np.ascontiguousarray(array)
        names = [spec.name for spec in self._outputs]
        if outputs is not None:
            bad = sorted(set(outputs) - set(names))
            if bad:
                raise InferenceInputError(f"unknown output tensor(s): {', '.join(bad)}")
            names = [n for n in names if n in set(outputs)]
        results = self._session.run(names, feed)
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    def infer(self, rgb: np.ndarray) -> TissueResult:
        """Tissue mask and fraction of an RGB uint8 H x W x 3 image (e.g. a slide's low-res
        image from ``services.tiling.engine.read_low_res_rgb``)."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
            raise InferenceInputError("image must be a uint8 numpy array")
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InferenceInputError("image must be H x W x 3 RGB")
        tensor = (rgb.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[np.newaxis]
        result = self.raw_infer({INPUT_NAME: tensor}, [MASK_OUTPUT, FRACTION_OUTPUT])
        mask = np.ascontiguousarray(result[MASK_OUTPUT][0, 0], dtype=np.uint8)
        fraction = float(result[FRACTION_OUTPUT].reshape(-1)[0])
        return TissueResult(fraction=fraction, mask=mask)


def mask_png(mask: np.ndarray) -> bytes:
    """8-bit greyscale PNG of a tissue mask (H x W, or [1, 1, H, W]): tissue 255, else 0."""
    array = np.asarray(mask)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError("mask must be H x W")
    image = Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
