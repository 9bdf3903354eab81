"""Layer 1: ONNX models - loading with external-data checks, site types, op rules,
the statistics rewrite, decoder input synthesis and scope. Imports nothing above it."""
