"""colearn: language models that learn by experience from each other."""

import envs  # noqa: F401  (registers the colearn/... gymnasium ids)

__version__ = "0.1.0"
