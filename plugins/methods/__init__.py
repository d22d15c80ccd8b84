"""Training methods (``standard``, ``cure``) registered through the ``cure_eval.methods`` entry point."""
