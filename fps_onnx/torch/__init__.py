"""Layer 6: the PyTorch side - models from specs, export, mask mapping, training, GPS.

Every module here but ``train.recipe`` needs torch; nothing below this layer imports it.
"""
