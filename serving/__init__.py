"""The segmentation API and the runtimes under it.

- :mod:`serving.runtime`: the ``Predictor`` contract and its PyTorch / ONNX Runtime /
  TensorRT implementations (``load_predictor(path)``);
- :mod:`serving.prompting`: box-prompted masks, shared by every runtime;
- :mod:`serving.app`: the FastAPI app (``create_app``); :mod:`serving.cli`: ``boxteacher serve``;
- :mod:`serving.benchmark`: ``boxteacher benchmark serve``.
"""
