"""Export: ONNX graphs with a parity check, optional int8 quantisation, the Triton model repository."""
