"""python -m onnxfold IN OUT"""

from . import _console

_console()
