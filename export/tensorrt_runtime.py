"""Run the TensorRT plans built by :mod:`export.tensorrt_build` with the ONNX Runtime outputs.

:class:`TensorRTRunner` is one plan: ``run_torch(feeds) -> {output name: CUDA tensor}`` (no
copy to the host); :class:`TensorRTModel` is an export's two plans (encoder and prompt
graph, :func:`export.metadata.prompt_path`) with the ``encode`` / ``prompt`` methods of
:class:`export.onnx_runtime.OnnxModel` (same names, shapes and meanings; see that module's
docstring), returning CUDA tensors. Buffers are torch CUDA tensors; inference is
``execute_async_v3`` on the current torch stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.metadata import IMAGE_FEATURES, ExportMetadata, prompt_path, read_engine_metadata
from export.tensorrt_build import import_tensorrt


class TensorRTRunner:
    """One TensorRT engine + execution context (not thread-safe: one run at a time)."""

    def __init__(self, engine_path: str | Path, device: str = "cuda"):
        import torch  # noqa: PLC0415

        trt = import_tensorrt()
        self.trt = trt
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False")
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        self.device = torch.device(device if str(device).startswith("cuda") else "cuda")
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"could not load {engine_path} with TensorRT {trt.__version__}: engines only run on the TensorRT "
                "version and GPU that built them (rebuild it with 'boxteacher export tensorrt')"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._allocator = None

    def _torch_dtype(self, dt):
        import torch  # noqa: PLC0415

        trt = self.trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
            trt.int8: torch.int8,
        }
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        if dt not in table:
            raise RuntimeError(f"unsupported TensorRT tensor type {dt}")
        return table[dt]

    def run_torch(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """{input name: tensor or array} -> {output name: CUDA tensor}."""
        import torch  # noqa: PLC0415

        dev = self.device
        stream = torch.cuda.current_stream(dev)
        keep = []  # inputs must outlive the asynchronous execution
        for name in self.inputs:
            if name not in feeds:
                raise ValueError(f"engine input {name!r} is not one of {list(feeds)}")
            # shape-inference inputs live in host memory, the others on the GPU
            host = self.engine.is_shape_inference_io(name)
            t = torch.as_tensor(feeds[name]).to("cpu" if host else dev, self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        dynamic = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # data-dependent: TensorRT asks the allocator
                dynamic.append(name)
                continue
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=dev)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if dynamic:
            allocator = self._output_allocator()
            for name in dynamic:
                self.context.set_output_allocator(name, allocator)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        for name in dynamic:
            shape = self._allocator.shapes[name]
            n = int(np.prod(shape)) if shape else 1
            dtype = self.dtypes[name]
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            outputs[name] = self._allocator.buffers[name][:nbytes].view(dtype).reshape(shape).clone()
        return {name: outputs[name] for name in self.outputs}

    def _output_allocator(self):
        import torch  # noqa: PLC0415

        if self._allocator is not None:
            return self._allocator
        trt, dev = self.trt, self.device

        class Allocator(trt.IOutputAllocator):
            def __init__(self):
                trt.IOutputAllocator.__init__(self)
                self.buffers: dict[str, torch.Tensor] = {}
                self.shapes: dict[str, tuple[int, ...]] = {}

            def reallocate_output(self, name, memory, size, alignment):
                buf = self.buffers.get(name)
                if buf is None or buf.numel() < size:
                    self.buffers[name] = buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=dev)
                return buf.data_ptr()

            def reallocate_output_async(self, name, memory, size, alignment, stream):
                return self.reallocate_output(name, memory, size, alignment)

            def notify_shape(self, name, shape):
                self.shapes[name] = tuple(int(d) for d in shape)

        self._allocator = Allocator()
        return self._allocator


class TensorRTModel:
    """An export's two plans (``model.engine`` and ``model.prompt.engine``) and the encoder's
    sidecar metadata; :meth:`encode` and :meth:`prompt` as :class:`export.onnx_runtime.OnnxModel`,
    returning CUDA torch tensors."""

    def __init__(self, engine: str | Path, device: str = "cuda"):
        engine = Path(engine)
        self.metadata: ExportMetadata = read_engine_metadata(engine)
        second = prompt_path(engine)
        if not second.is_file():
            raise FileNotFoundError(
                f"{engine.name} needs its prompt plan {second.name} next to it (both are built by 'boxteacher export tensorrt')"
            )
        self.encoder = TensorRTRunner(engine, device)
        self.prompter = TensorRTRunner(second, device)
        self.device = self.encoder.device
        self.fixed_hw = self.metadata.fixed_hw

    def encode(self, images_padded, image_size) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        size = image_size if torch.is_tensor(image_size) else torch.as_tensor(np.asarray(image_size, dtype=np.int64))
        return self.encoder.run_torch({"images": torch.as_tensor(images_padded, dtype=torch.float32), "image_size": size.reshape(2)})

    def prompt(self, features: dict[str, Any], prompt_boxes) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        boxes = torch.as_tensor(prompt_boxes, dtype=torch.float32).reshape(-1, 4)
        if boxes.shape[0] == 0:
            raise ValueError("the prompt engine needs at least one box")
        return self.prompter.run_torch({"prompt_boxes": boxes, **{k: features[k] for k in IMAGE_FEATURES}})
