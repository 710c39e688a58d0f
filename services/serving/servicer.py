"""gRPC servicers of model serving: the Open Inference Protocol (KServe v2) and Tessera's
slide-level inference. Both only convert messages and call `InferenceService`."""

from __future__ import annotations

import numpy as np
from grpc import aio

from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.serving.core import InferenceService, decode_tensor
from services.shared.auth import current_principal
from services.shared.errors import InvalidArgument, NotFound
from tessera.common.v1 import common_pb2
from tessera.serving.v1 import serving_pb2, serving_pb2_grpc

SERVER_NAME = "tessera-serving"
SERVER_VERSION = "0.1.0"
_DTYPE_NAME = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
}
_CONTENTS_FIELD = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
}


def _input_array(req: oip.ModelInferRequest, i: int) -> np.ndarray:
    tensor = req.inputs[i]
    shape = list(tensor.shape)
    if req.raw_input_contents:
        if len(req.raw_input_contents) != len(req.inputs):
            raise InvalidArgument("raw_input_contents must have one entry per input", "BAD_INPUTS")
        return decode_tensor(tensor.name, tensor.datatype, shape, req.raw_input_contents[i])
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"unsupported datatype {tensor.datatype}", "BAD_DATATYPE")
    values = getattr(tensor.contents, field)
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "UINT8": np.uint8}
    arr = np.asarray(values, dtype=dtype[tensor.datatype])
    if arr.size != int(np.prod(shape)) or any(d <= 0 for d in shape):
        raise InvalidArgument(f"input {tensor.name}: contents do not match shape", "BAD_SHAPE")
    return arr.reshape(shape)


class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self._svc = service

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._svc.registry.ready)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        try:
            self._svc.registry.get(request.name, request.version)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        model = self._svc.registry.get(request.name, request.version)
        meta = model.detector.metadata()
        versions = sorted(m.version for m in self._svc.registry.all() if m.name == model.name)
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=[oip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[oip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        if not request.inputs:
            raise InvalidArgument("at least one input is required", "BAD_INPUTS")
        inputs = {t.name: _input_array(request, i) for i, t in enumerate(request.inputs)}
        model, outputs = await self._svc.infer_tensors(
            request.model_name, request.model_version, inputs
        )
        wanted = [o.name for o in request.outputs] or sorted(outputs)
        resp = oip.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        for name in wanted:
            if name not in outputs:
                raise InvalidArgument(f"unknown output {name}", "BAD_OUTPUT")
            arr = np.ascontiguousarray(outputs[name])
            resp.outputs.append(
                oip.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=_DTYPE_NAME[arr.dtype], shape=list(arr.shape)
                )
            )
            resp.raw_output_contents.append(arr.tobytes())
        return resp


class SlideInferenceServicer(serving_pb2_grpc.SlideInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self._svc = service

    async def InferSlide(
        self, request: serving_pb2.InferSlideRequest, context: aio.ServicerContext
    ) -> serving_pb2.InferSlideResponse:
        if not request.slide_id:
            raise InvalidArgument("slide_id is required", "MISSING_FIELD")
        r = await self._svc.infer_slide(
            current_principal(), request.slide_id, request.model_name, request.model_version
        )
        res = common_pb2.InferenceResult(
            model_name=r["model_name"],
            model_version=r["model_version"],
            tissue_fraction=r["tissue_fraction"],
            mask_bucket=r["mask_bucket"],
            mask_key=r["mask_key"],
        )
        return serving_pb2.InferSlideResponse(result=res)

    async def ListModels(
        self, request: serving_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> serving_pb2.ListModelsResponse:
        return serving_pb2.ListModelsResponse(
            models=[
                serving_pb2.ModelInfo(
                    name=m.name,
                    version=m.version,
                    platform="onnxruntime_onnx",
                    sha256=m.sha256,
                    bucket=m.bucket,
                    key=m.key,
                )
                for m in self._svc.registry.all()
            ]
        )
