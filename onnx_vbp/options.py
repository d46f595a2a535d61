"""The vocabulary of options shared by the API and the CLI: each choice defined once."""

from __future__ import annotations

# importance criteria: what orders a block's neurons for removal (see `importance`)
SCORES = ("variance", "variance-x-norm", "obs")
# how the budget is spread: over all blocks by cost, or the same fraction from each (see `select`)
SCOPES = ("global", "per-block")
# how obs spreads a global budget over blocks: each block's costs divided by the energy of the
# residual stream it writes to, raised to this power; "measured" tries each on calibration samples
# and keeps the plan whose outputs move least (see `pipeline.allocated_plan`)
STREAM_POWERS = {"stream": 1.0, "sqrt-stream": 0.5, "absolute": 0.0}
ALLOCATIONS = (*STREAM_POWERS, "measured")
# how fc2 absorbs the removed neurons (see `rewrite.compensation`)
COMPENSATIONS = ("mean", "ridge", "none")
# What each method ranks neurons by, and how fc2 absorbs the removed ones.
METHODS = {
    "obs": ("obs", "ridge"),  # structured OBS: compensation-aware ranking, ridge refit of fc2 (default)
    "vbp": ("variance", "mean"),  # the paper: lowest variance first, mean folded into fc2's bias
}
# λ of the Hessian Σ + λI, relative to the mean neuron variance: obs ranks and rewrite's ridge refits with it
DEFAULT_RIDGE_LAMBDA = 1e-3
