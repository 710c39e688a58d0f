"""Tissue-detection model: built with ``onnx.helper`` from fitted parameters (``build``) and
run with onnxruntime (``runtime``). Transport-free; the KServe v2 servicer wraps
:class:`TissueDetector`.

``build`` is not imported here so that ``python -m services.serving.model.build`` runs cleanly;
import ``services.serving.model.build`` for :func:`build_tissue_model`.
"""

from .graph import FRACTION_OUTPUT, INPUT_NAME, MASK_OUTPUT, DecisionParams, build_graph
from .runtime import (
    KSERVE_TO_NUMPY,
    ORT_TO_KSERVE,
    InferenceInputError,
    ModelLoadError,
    TensorSpec,
    TissueDetector,
    TissueResult,
    mask_png,
)

__all__ = [
    "FRACTION_OUTPUT",
    "INPUT_NAME",
    "KSERVE_TO_NUMPY",
    "MASK_OUTPUT",
    "ORT_TO_KSERVE",
    "DecisionParams",
    "InferenceInputError",
    "ModelLoadError",
    "TensorSpec",
    "TissueDetector",
    "TissueResult",
    "build_graph",
    "mask_png",
]
