"""cure_eval: curvature regularisation (CURE) and honest robustness audits for timm models.

Importing the package registers its model families into timm's registry, so
``timm.create_model("wide_resnet28_10", num_classes=10, in_chans=3)`` works afterwards.
"""

from __future__ import annotations

import logging

from .models import load_model_plugins

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
load_model_plugins()
