import sys

from onnx_vbp.cli import main

sys.exit(main())
