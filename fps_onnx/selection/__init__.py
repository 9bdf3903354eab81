"""Layer 4: scores and top-k selection (``score``), the mask file format (``maskfile``)."""
