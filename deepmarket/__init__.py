"""DeepMarket: lend idle machines, borrow others' to train TensorFlow models, pay in credits."""

__version__ = "0.1.0"
