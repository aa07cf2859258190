"""Conversion of models to TorchScript, ONNX and int8, shared by `export` and `bench`."""
