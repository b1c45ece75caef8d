"""python -m onnxfold IN OUT"""

from .cli import main

raise SystemExit(main())
