"""ONNX graph of the tissue detector, assembled with ``onnx.helper``.

INPUT__0  FP32 [1, 3, H, W]   RGB in 0..1, NCHW
  -> Clip(0, 1)
  -> saturation = ReduceMax(c) - ReduceMin(c);  darkness = 1 - ReduceMean(c)
  -> Concat -> Conv 1x1 (weights [w_s, w_d], bias -threshold)      linear decision score
  -> AveragePool k x k (stride 1, same padding, borders not padded)  smoothing
  -> Greater(0)
  -> mask             UINT8 [1, 1, H, W]   1 = tissue
  -> tissue_fraction  FP32  [1]            mean of the mask
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME: Final = "INPUT__0"
MASK_OUTPUT: Final = "mask"
FRACTION_OUTPUT: Final = "tissue_fraction"
OPSET: Final = 18
IR_VERSION: Final = 9  # ONNX 1.15+; widely supported by onnxruntime
PRODUCER: Final = "tessera.serving.model.build"


@dataclass(frozen=True)
class DecisionParams:
    w_saturation: float
    w_darkness: float
    threshold: float
    pool_kernel: int = 5

    def __post_init__(self) -> None:
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0 or self.pool_kernel > 31:
            raise ValueError("pool_kernel must be an odd integer within 1..31")
        for value in (self.w_saturation, self.w_darkness, self.threshold):
            if not np.isfinite(value):
                raise ValueError("decision parameters must be finite")


def _const(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(values, name=name)


def build_graph(
    params: DecisionParams, *, name: str = "tissue-detector", version: str = "1"
) -> onnx.ModelProto:
    """The ONNX model for ``params``. Deterministic: same params -> same bytes."""
    k = params.pool_kernel
    pad = k // 2
    initializers = [
        _const("clip_min", np.array(0.0, dtype=np.float32)),
        _const("clip_max", np.array(1.0, dtype=np.float32)),
        _const("one", np.array(1.0, dtype=np.float32)),
        _const("zero", np.array(0.0, dtype=np.float32)),
        _const("channel_axis", np.array([1], dtype=np.int64)),
        _const("fraction_shape", np.array([1], dtype=np.int64)),
        _const(
            "decision_weight",
            np.array([params.w_saturation, params.w_darkness], dtype=np.float32).reshape(
                1, 2, 1, 1
            ),
        ),
        _const("decision_bias", np.array([-params.threshold], dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Clip", [INPUT_NAME, "clip_min", "clip_max"], ["rgb"], name="clip"),
        helper.make_node(
            "ReduceMax", ["rgb", "channel_axis"], ["rgb_max"], keepdims=1, name="rgb_max"
        ),
        helper.make_node(
            "ReduceMin", ["rgb", "channel_axis"], ["rgb_min"], keepdims=1, name="rgb_min"
        ),
        helper.make_node(
            "ReduceMean", ["rgb", "channel_axis"], ["rgb_mean"], keepdims=1, name="rgb_mean"
        ),
        helper.make_node("Sub", ["rgb_max", "rgb_min"], ["saturation"], name="saturation"),
        helper.make_node("Sub", ["one", "rgb_mean"], ["darkness"], name="darkness"),
        helper.make_node(
            "Concat", ["saturation", "darkness"], ["features"], axis=1, name="features"
        ),
        helper.make_node(
            "Conv",
            ["features", "decision_weight", "decision_bias"],
            ["score"],
            kernel_shape=[1, 1],
            name="linear_decision",
        ),
        helper.make_node(
            "AveragePool",
            ["score"],
            ["smoothed_score"],
            kernel_shape=[k, k],
            strides=[1, 1],
            pads=[pad, pad, pad, pad],
            count_include_pad=0,
            name="smoothing",
        ),
        helper.make_node("Greater", ["smoothed_score", "zero"], ["is_tissue"], name="threshold"),
        helper.make_node("Cast", ["is_tissue"], [MASK_OUTPUT], to=TensorProto.UINT8, name="mask"),
        helper.make_node(
            "Cast", ["is_tissue"], ["mask_float"], to=TensorProto.FLOAT, name="mask_float"
        ),
        helper.make_node(
            "ReduceMean", ["mask_float"], ["fraction_scalar"], keepdims=0, name="fraction"
        ),
        helper.make_node(
            "Reshape",
            ["fraction_scalar", "fraction_shape"],
            [FRACTION_OUTPUT],
            name="fraction_shape",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tissue_detector",
        inputs=[
            helper.make_tensor_value_info(
                INPUT_NAME,
                TensorProto.FLOAT,
                [1, 3, "height", "width"],
                doc_string="RGB in 0..1, NCHW",
            )
        ],
        outputs=[
            helper.make_tensor_value_info(
                MASK_OUTPUT,
                TensorProto.UINT8,
                [1, 1, "height", "width"],
                doc_string="1 = tissue, 0 = background",
            ),
            helper.make_tensor_value_info(
                FRACTION_OUTPUT, TensorProto.FLOAT, [1], doc_string="share of tissue pixels"
            ),
        ],
        initializer=initializers,
        doc_string="Tissue vs. background from saturation and darkness (fitted by Otsu/LDA).",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        model_version=int(version) if version.isdigit() else 0,
        doc_string=f"{name} {version}",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "name": name,
            "version": version,
            "w_saturation": repr(params.w_saturation),
            "w_darkness": repr(params.w_darkness),
            "threshold": repr(params.threshold),
            "pool_kernel": str(params.pool_kernel),
        },
    )
    return model


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)
