"""onnx_vbp: Variance-Based Pruning of the MLP blocks of ONNX models, after training.

The pipeline, one stage per module, plain records between them::

    blocks = find_mlp_blocks(model)                 # list[MlpBlock]
    stats = calibrate(model, blocks, batches)       # {block name: Stats}
    plan = select(stats, ratio=0.35)                # Plan: kept neuron indices per block
    pruned = rewrite(model, blocks, stats, plan)    # a new onnx.ModelProto

`prune` runs all of it in memory in one call, `prune_file` on files, as the command line does.
"""

__version__ = "0.1.0"

from onnx_vbp.calibrate import calibrate
from onnx_vbp.data import iter_batches, model_inputs
from onnx_vbp.errors import VbpError
from onnx_vbp.evaluate import evaluate
from onnx_vbp.find import find_mlp_blocks
from onnx_vbp.importance import rankings
from onnx_vbp.instrument import instrument
from onnx_vbp.pipeline import PruneOptions, prune, prune_file
from onnx_vbp.records import MlpBlock, Plan, Ranking
from onnx_vbp.report import Report
from onnx_vbp.rewrite import rewrite
from onnx_vbp.select import select
from onnx_vbp.stats import Stats

__all__ = [
    "MlpBlock",
    "Plan",
    "PruneOptions",
    "Ranking",
    "Report",
    "Stats",
    "VbpError",
    "calibrate",
    "evaluate",
    "find_mlp_blocks",
    "instrument",
    "iter_batches",
    "model_inputs",
    "prune",
    "prune_file",
    "rankings",
    "rewrite",
    "select",
]
