"""CIFAR-style model families registered into timm's registry."""
