"""lifecycle: a Hydra-configured training lifecycle for image and video diffusion models."""

import os

__version__ = "0.1.0"

# transformers (>= 5.2x) swaps model layers for kernels it downloads from the hub on every from_pretrained unless told
# not to: code from outside the model folder, fetched at run time (and, offline or without the `kernels` package, a
# crash). Off unless the user opts in with USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")
