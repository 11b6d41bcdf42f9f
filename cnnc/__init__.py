"""cnnc: a compiler for convolutional neural networks.

`import cnnc` stays light: the command line and `cnnc --help` must start fast, so the
heavy parts (lark, networkx, pydantic, numpy) load when a command needs them.
"""

__version__ = "0.1.0"
