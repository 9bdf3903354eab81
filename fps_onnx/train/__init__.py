"""Sparse fine-tuning of a PyTorch model on the entries a mask file selects.

``fps_onnx.train.sparse`` holds the parametrisation (k values + indices per
weight) and the load / merge / delta-file API; ``data`` the training data
readers; ``loop`` the training loop; ``recipe`` the defaults. Importing any of
them needs torch; ``fps-onnx select`` never imports this package.
"""
