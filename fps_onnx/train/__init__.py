"""Sparse fine-tuning of a PyTorch model on the entries a mask file selects.

``sparse`` holds the parametrisation (k values + indices per weight) and the
attach / merge / delta-file API; ``data`` the training data readers; ``loop``
which tensors train, the optimizer, schedule and epochs; ``run`` the whole
``fps-onnx train`` job; ``recipe`` its defaults. Importing any module but
``recipe`` needs torch; ``fps-onnx select`` never imports this package.
"""
