"""python -m onnxfold IN OUT"""

from .cli import console

console()
