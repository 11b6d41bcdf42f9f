"""cnnc: a compiler for convolutional neural networks.

`import cnnc` stays light: the command line and `cnnc --help` must start fast, so the
heavy parts (lark, networkx, pydantic, numpy) load when a command needs them.
"""

import os as _os

__version__ = "0.1.0"

# Installed, the subpackages dsl/, compiler/, backends/, runtime/ sit inside this package. In a
# source checkout they sit beside this folder (the repository's top level); when Python imports
# `cnnc` from a checkout (`python -m cnnc` run at the top), look for them there.
_here = _os.path.dirname(_os.path.abspath(__file__))
_top = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "dsl")) and _os.path.isfile(_os.path.join(_top, "dsl", "__init__.py")):
    __path__.append(_top)

_API = ("load", "train", "evaluate", "prepare")


def __getattr__(name):
    """`cnnc.load`, `cnnc.train`, `cnnc.evaluate`: the Python API, imported on first use."""
    if name in _API:
        from cnnc.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnc' has no attribute {name!r}")
