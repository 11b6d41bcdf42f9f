"""The limits on what a `.cnn` program may ask for, named once and checked before the work.

Each guards a resource that a hostile or mistaken input could exhaust: memory in the parser,
Python's stack in the tree walks, time in the graph builder. The numbers are far above what
real networks need (DenseNet-201 is 3 KiB of source, 6 levels deep, 700 layers), and each
error message names the limit it hit.
"""

MAX_SOURCE_BYTES = 256 << 10  # one .cnn file (256 KiB: about 6,000 lines; parsing a full one takes 2 s)
MAX_IMPORTS = 256  # files one program reads, its own and every one it imports
MAX_NESTING = 64  # in one file: parentheses, indented bodies, operators within one expression
MAX_CALL_DEPTH = 64  # while building: block calls, loops and groups inside one another
MAX_NUMBER_DIGITS = 30  # digits of one number literal
MAX_INT = 10**15  # integer values in expressions and sizes, in magnitude
MAX_LAYERS = 20_000  # layers a network expands to; also the longest loop or repeat (time grows with it)
MAX_ERRORS = 50  # distinct errors reported before a stage stops
