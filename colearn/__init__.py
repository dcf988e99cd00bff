"""colearn: language models that learn by experience from each other."""

__version__ = "0.1.0"
