"""The root of every error a bad input can cause (foundation: imports nothing of onnx_vbp)."""

from __future__ import annotations


class VbpError(ValueError):
    """A model, data, statistics file or option that onnx_vbp cannot work with. The command line
    prints it as one line `onnx-vbp: error: ...` and exits with status 1; any other exception
    escaping it is a bug.

    Messages name an option by its API name in backquotes (`min_keep`); the command line shows
    it as its flag (--min-keep)."""
