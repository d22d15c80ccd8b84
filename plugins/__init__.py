"""Built-in plugins of cure_eval (installed under the import name ``cure_eval_plugins``).

``methods/`` holds the training methods, ``models/`` the timm model registrations. Both are
discovered through entry points (``cure_eval.methods``, ``cure_eval.models``), exactly as a
third-party package's plugins are.
"""
