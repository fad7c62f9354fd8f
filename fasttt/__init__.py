"""fasttt: train image classifiers in generations with a tolerant teacher, fast."""

__version__ = "0.1.0"
