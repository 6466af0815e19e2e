"""sftlab command line: parses arguments into config sections and calls one library function per command (every
command has a Python API). The commands live in `train.py`, `evaluate.py` and `data.py`; their flags are made from
the config's own definitions (`options.py`)."""

from . import train, evaluate, data, ifeval  # each registers its commands on `app`, in this order  # noqa: I001
from .common import app

__all__ = ["app", "train", "evaluate", "data", "ifeval"]
