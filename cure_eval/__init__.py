"""cure_eval: curvature regularisation (CURE) and honest robustness audits for timm models.

Importing the package registers its model families into timm's registry, so
``timm.create_model("wide_resnet28_10", num_classes=10, in_chans=3)`` works afterwards.
"""

from __future__ import annotations

import logging

from ._compat import install as _install_old_paths
from .core._openmp import prefer_passive_openmp

prefer_passive_openmp()  # before the first import of torch (below): see cure_eval/core/_openmp.py
_install_old_paths()  # the old module paths, until 0.3: see cure_eval/_compat

from .models import load_model_plugins  # noqa: E402

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
load_model_plugins()
