"""lifecycle: a Hydra-configured training lifecycle for image and video diffusion models."""

import os
from pathlib import Path

__version__ = "0.1.0"

# transformers (>= 5.2x) swaps model layers for kernels it downloads from the hub on every from_pretrained unless told
# not to: code from outside the model folder, fetched at run time (and, offline or without the `kernels` package, a
# crash). Off unless the user opts in with USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")

# The Hydra config tree: the checkout's conf/, or LIFECYCLE_CONF.
CONF_DIR = os.environ.get("LIFECYCLE_CONF", str(Path(__file__).resolve().parents[2] / "conf"))
