"""Work on models rather than with them: benchmarks, conversion to ONNX, export to GGUF."""
