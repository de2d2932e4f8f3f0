"""The ``xai-audit`` command line (DESIGN.md, "Command line").

Options of our own are parsed here; everything else is handed to Beam as pipeline options, after
checking that Beam knows it (a typo is a usage error, exit 2, not a silently dropped flag).
Run-stopping problems print one paragraph and exit 1; no traceback.
"""
import argparse
import logging
import math
import os
import sys
import textwrap
import warnings
from typing import List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF C++ chatter drowns the progress log

from . import __version__  # noqa: E402
from .explain import registry as method_registry, precision  # noqa: E402
from .job.cost import DEFAULT_FAITHFULNESS_SAMPLE, DEFAULT_SANITY_SAMPLE  # noqa: E402
from .errors import AuditError  # noqa: E402

EPILOG = (
    "Beam pipeline options pass through, e.g. --runner DataflowRunner --project P --region R "
    "--temp_location gs://B/tmp, or --direct_num_workers 2 --direct_running_mode "
    "multi_processing. Without --runner the job runs locally on Beam's FnApiRunner. "
    "Add --dry_run --no_auth to a DataflowRunner command to translate the job offline without "
    "submitting it or writing anything."
)


LOG_LEVELS = ("debug", "info", "warning")


def _comma_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _method_list(text: str) -> List[str]:
    """--methods: a comma list of known attribution methods; anything else is a usage error
    (exit 2) with the closest name."""
    import difflib

    ALL_METHODS = list(method_registry.NAMES)
    methods = _comma_list(text)
    for method in methods:
        if method not in ALL_METHODS:
            close = difflib.get_close_matches(method, ALL_METHODS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise argparse.ArgumentTypeError(
                f"invalid choice: {method!r}{hint}; choose from {', '.join(ALL_METHODS)}")
    if not methods:
        raise argparse.ArgumentTypeError(f"name one or more of {', '.join(ALL_METHODS)}")
    return methods
def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (else a usage error, exit 2, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _path(text: str) -> str:
    """An argparse type: a non-blank path (``--output ""`` would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a folder or file")
    return text


def _float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] when ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    parse.__name__ = "number"
    return parse


def _option_type(option):
    """A method option's argparse type: an out-of-range number is a usage error (exit 2) here;
    the same bounds (MethodOption.check) guard callers that build an AuditRequest directly."""
    if option.type is int and option.minimum is not None:
        return _int_at_least(int(option.minimum))
    if option.type is float:
        exclusive = option.exclusive_minimum is not None
        low = option.exclusive_minimum if exclusive else option.minimum
        return _float_in(-math.inf if low is None else low, low_open=exclusive)
    return option.type


def _add_beam_help(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """What the command prints: the end-of-run summary on stdout, the log on stderr."""
    parser.add_argument("--quiet", action="store_true",
                        help="print only the verdict line and the report path at the end, and "
                             "log warnings only (unless --log-level is given)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="progress log detail: debug adds Beam's and TensorFlow's own "
                             "messages; warning shows problems only [info]")


# The run options' defaults are AuditRequest's (job/plan.py), the one place they are written: the
# parser leaves an option it was not given at None and _request_from_args lets the dataclass
# fill it in. (Reading the dataclass here would import TensorFlow for `xai-audit --help` and
# `xai-audit report`.) The [default] in each help text is checked against it by a test.


def _add_data_options(run: argparse.ArgumentParser) -> None:
    """Where the model, the data and the outputs are, and which columns mean what."""
    run.add_argument("--model", required=True, type=_path,
                     help=".keras, .h5, or a SavedModel directory")
    run.add_argument("--data", required=True, type=_path,
                     help="a folder of class subfolders, a manifest .csv/.parquet, or a TFRecord glob")
    run.add_argument("--output", required=True, type=_path,
                     help="folder for every output (local or gs://)")
    run.add_argument("--image-column", help="manifest/tf.Example image key [image]")
    run.add_argument("--label-column", help="label key [label]")
    run.add_argument("--mask-column", help="ground-truth mask key [mask]")
    run.add_argument("--id-column", help="example id key [id]")
    run.add_argument("--slice-columns", type=_comma_list,
                     help="columns carried to every output and sliced on [all other manifest "
                          "columns; those with more than 50 distinct values are carried, not "
                          "sliced]")
    run.add_argument("--slice-bins", action="append", metavar="COLUMN=EDGES",
                     help="slice a numeric column into half-open bins, e.g. age=0,40,65,120 "
                          "(slice column age_bin: [0,40), ..., out_of_range); repeatable")
    run.add_argument("--class-names", type=_comma_list,
                     help="names for class indices [folder names / manifest label strings]")


def _add_explain_options(run: argparse.ArgumentParser) -> None:
    """How the model is fed and which maps are computed."""
    from .io.decode import PREPROCESS_MODES

    run.add_argument("--preprocess", choices=PREPROCESS_MODES,
                     help="pixel scaling the model expects [unit: /255]")
    run.add_argument("--methods", type=_method_list,
                     help=f"comma list of {', '.join(method_registry.NAMES)} [gradcam]")
    run.add_argument("--map-size", type=_int_at_least(1),
                     help="input-resolution maps are average-pooled to at most this size [56]")
    for option in method_registry.OPTIONS.values():  # --gradcam-activation, --ig-steps, ...
        run.add_argument(option.flag, type=_option_type(option), default=option.default,
                         choices=option.choices or None, help=f"{option.help} [{option.default}]")
    run.add_argument("--layer",
                     help="auto (last 4-D layer, nested models searched), a layer name, a comma "
                          "list, or all (Grad-CAM sweep over every 4-D layer) [auto]")
    run.add_argument("--target",
                     help="class to explain: predicted, label, or a class index [predicted]")
    run.add_argument("--batch-size", type=_int_at_least(1), help="images per model call [32]")
    run.add_argument("--precision", choices=precision.CHOICES, help=precision.HELP)
    run.add_argument("--seed", type=_int_at_least(0), help="seed of every random choice [0]")
    run.add_argument("--image-size",
                     help="HxW to resize to, for models without a fixed input size")


def _add_gate_options(run: argparse.ArgumentParser) -> None:
    """What fails the run: the error rate, TFMA's thresholds, slice gaps, the default gates."""
    run.add_argument("--max-error-rate", type=_float_in(0.0, 1.0),
                     help="share of examples that may fail before the run fails (exit 4) [0.01]")
    run.add_argument("--tfma-config",
                     help="text-format TFMA EvalConfig, or none to skip TFMA "
                          "[tfma_configs/binary.pbtxt or multiclass.pbtxt by the number of classes]")
    run.add_argument("--confidence-intervals", action="store_true",
                     help="TFMA confidence intervals (Poisson bootstrap) for every metric")
    run.add_argument("--max-slice-gap",
                     help="fairness gate, e.g. auc=0.05,binary_accuracy=0.1: fail (exit 3) when the "
                          "best and worst slice of a slice column differ by more; METRIC is a "
                          "name the TFMA config computes")
    run.add_argument("--min-slice-size", type=_int_at_least(0),
                     help="slices with fewer examples are left out of --max-slice-gap gaps and "
                          "marked small in the report [30]")
    run.add_argument("--baseline-gates", choices=("on", "off"),
                     help="default gates on labeled data: better than chance, not degenerate "
                          "(fail: exit 3) [on]")


def _add_measure_options(run: argparse.ArgumentParser) -> None:
    """How much faithfulness, sanity and permutation importance measure."""
    from .measures.importance import DEFAULT_SAMPLE

    run.add_argument("--faithfulness-sample", type=_int_at_least(0),
                     help="about this many seeded examples get deletion/insertion AUCs per method, "
                          f"means with a 95%% interval (0: off) [{DEFAULT_FAITHFULNESS_SAMPLE}]")
    run.add_argument("--sanity-sample", type=_int_at_least(0),
                     help="about this many seeded examples for the model-randomization sanity "
                          f"check (0: off) [{DEFAULT_SANITY_SAMPLE}]")
    run.add_argument("--permutation-features",
                     help="permutation importance features: patches:RxC, channels, or none "
                          "[patches:4x4]")
    run.add_argument("--permutation-repeats", type=_int_at_least(1),
                     help="permutations per feature per shard [3]")
    run.add_argument("--importance-sample",
                     help="labeled examples permutation importance runs on, a seeded sample by "
                          f"id hash, or all [{DEFAULT_SAMPLE}]")
    run.add_argument("--shard-size", type=_int_at_least(1),
                     help="examples per permutation shard [256]")


def _add_safety_options(run: argparse.ArgumentParser) -> None:
    """What the audit refuses to read, load or replace unless told."""
    from .io.decode import DEFAULT_MAX_IMAGE_PIXELS
    from .io.sources import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_TIMEOUT_S

    run.add_argument("--unsafe-deserialization", action="store_true",
                     help="load models (.keras, .h5 or SavedModel) holding Python code, e.g. "
                          "Lambda layers: runs code from the file; refused without it")
    run.add_argument("--allow-paths-outside-data", action="store_true",
                     help="let manifest image/mask paths point outside the manifest's folder "
                          "(../x.png, absolute paths, other buckets); without it such an example "
                          "is an error row (path_outside_data)")
    run.add_argument("--max-image-pixels", type=_int_at_least(1),
                     help=f"refuse images above this many pixels [{DEFAULT_MAX_IMAGE_PIXELS}]")
    run.add_argument("--max-image-bytes", type=int,
                     help="refuse image/mask files above this many bytes, from their size before "
                          f"reading (file_too_large) [{DEFAULT_MAX_IMAGE_BYTES}]")
    run.add_argument("--read-timeout", type=float,
                     help="seconds one image/mask read may take, file system retries included, "
                          f"before it is an error row (read_timeout) [{DEFAULT_READ_TIMEOUT_S:g}]")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --output (only the files a run writes are "
                          "removed first) and take over the lock a killed run left; without it "
                          "a folder holding a run is refused")


def _add_run_options(run: argparse.ArgumentParser) -> None:
    _add_data_options(run)
    _add_explain_options(run)
    _add_gate_options(run)
    _add_measure_options(run)
    _add_safety_options(run)
    _add_output_options(run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xai-audit",
        description="Dataset-scale explainability and evaluation audit for Keras image classifiers.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"xai-audit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,demo,report}")
    run = commands.add_parser("run", help="audit a model on a dataset", allow_abbrev=False)
    _add_run_options(run)
    _add_beam_help(run)
    demo = commands.add_parser(
        "demo", help="make the synthetic demo dataset and model, then audit them", allow_abbrev=False
    )
    demo.add_argument("--output", required=True, type=_path,
                      help="folder for the demo data, model and audit")
    demo.add_argument("--examples", type=_int_at_least(1), default=480, help="examples to generate [480]")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of data, training and audit [0]")
    demo.add_argument("--pooling", choices=("max", "average"), default="max",
                      help="the demo model's global pooling: max (sharp Grad-CAM) or average (the "
                           "head original CAM needs; trains ~2x longer) [max]")
    demo.add_argument("--methods", type=_method_list, default=["gradcam"],
                      help="attribution methods of the demo audit, as for run [gradcam]")
    demo.add_argument("--layer", default="auto", help="layer(s) of the demo audit, as for run [auto]")
    _add_output_options(demo)
    demo.add_argument("--no-masks", action="store_true",
                      help="drop the mask column before the audit: the shortcut must then show "
                           "in the attention regions, maps and importances per site alone")
    _add_beam_help(demo)
    report = commands.add_parser(
        "report", help="re-render DIR/report/ (index.html, summary.json) from the files in DIR",
        allow_abbrev=False)
    report.add_argument("dir", metavar="DIR", type=_path,
                        help="the --output folder of a finished run")
    return parser


def _check_beam_args(parser: argparse.ArgumentParser, beam_args: Sequence[str]) -> None:
    """Every leftover flag must be a Beam pipeline option; anything else is a usage error."""
    from apache_beam.options.pipeline_options import PipelineOptions

    known = set(PipelineOptions([]).get_all_options())
    unknown = []
    for arg in beam_args:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name not in known:
                unknown.append(arg)
        elif not unknown and arg.startswith("-"):
            unknown.append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")


def _normalize_dry_run(beam_args: Sequence[str]) -> List[str]:
    """Beam's --dry_run takes a value; a bare ``--dry_run`` (the usual way to write a flag)
    becomes ``--dry_run=True`` instead of swallowing the next option or failing."""
    args = list(beam_args)
    for i, arg in enumerate(args):
        if arg in ("--dry_run", "--dry-run"):
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-"):
                args[i] = "--dry_run=True"
    return args


def _log_level(args) -> str:
    """--log-level, else warning with --quiet, else info (``report`` has neither option)."""
    chosen = getattr(args, "log_level", None)
    return chosen or ("warning" if getattr(args, "quiet", False) else "info")


def _configure_logging(level: str = "info") -> None:
    # TensorFlow/absl install a root handler on import, so ours gets its own handler.
    ours = logging.getLogger("xai_audit")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False
    from .beam import worker_logs

    worker_logs.install(level)  # worker processes' lines, unpacked (multi_processing)
    if level == "debug":  # everything the libraries say, TensorFlow's C++ start-up lines too
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        for library in ("apache_beam", "absl", "h5py", "tensorflow"):
            logging.getLogger(library).setLevel(logging.INFO)
        return
    for noisy in ("apache_beam", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TF and TFMA deprecation notices and TFMA's divide-by-zero warnings on one-class slices
    # say nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="tensorflow_model_analysis")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _request_from_args(args) -> "AuditRequest":
    """The parsed ``run`` options as an AuditRequest: an option left out (None) takes the
    dataclass's default, the one place the defaults are written."""
    from dataclasses import fields

    from .job.run import AuditRequest

    given = {f.name: getattr(args, f.name) for f in fields(AuditRequest)
             if getattr(args, f.name, None) is not None}
    if "baseline_gates" in given:
        given["baseline_gates"] = given["baseline_gates"] == "on"
    return AuditRequest(**given)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    _check_beam_args(parser, beam_args)
    beam_args = _normalize_dry_run(beam_args)
    level = _log_level(args)
    _configure_logging(level)
    if args.command in ("run", "demo") and level != "debug":
        from .beam.worker_logs import import_tensorflow_quietly

        import_tensorflow_quietly()
    summary = "quiet" if getattr(args, "quiet", False) else "full"
    try:
        if args.command == "run":
            from .job.run import run_audit

            return run_audit(_request_from_args(args), beam_args, summary)
        if args.command == "report":
            if beam_args:
                parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
            from .report.render import write_report
            from .io.runinfo import absolute_uri

            print(absolute_uri(write_report(args.dir)))
            return 0
        from .demo.run import run_demo

        return run_demo(args.output, args.examples, args.seed, beam_args, pooling=args.pooling,
                        methods=args.methods, layer=args.layer, summary=summary,
                        masks=not args.no_masks)
    except AuditError as exc:
        # Long paths, layer names and URIs stay whole (copy-pastable) rather than split.
        message = textwrap.fill(str(exc), width=100, break_long_words=False,
                                break_on_hyphens=False)
        if exc.exit_code == 2:  # a usage error, reported the way argparse reports its own
            print(f"usage: xai-audit {args.command} [options] (xai-audit {args.command} --help)",
                  file=sys.stderr)
        print(f"xai-audit: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xai-audit: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
