"""``sarjepa`` command line: parse, load config, call one runner, report its failure clearly.

Errors. Every expected failure ends in one ``sarjepa: error: <message>`` block on stderr, the
message naming the offending file, key or URI, and a non-zero exit status:

* 2: the command line, a config value or a job spec is wrong (``errors.UsageError``; argparse's
  own usage errors exit 2 as well);
* 1: anything else a user can act on: a missing input, dataset or checkpoint, bad data over
  budget, storage unreachable or refused (``errors.SarjepaError``, and any ``OSError``), a job the
  cluster refused; also when such a failure reaches the driver inside Ray's wrappers (a train
  worker's or a remote task's error);
* 130: interrupted (Ctrl-C).

The traceback of an expected failure is printed only with ``-v``/``--verbose``. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from sarjepa_dist import storage
from sarjepa_dist.config import Config, load_config
from sarjepa_dist.errors import SarjepaError

EXIT_FAILURE = 1
# -v: Ray's own detail on the console too (cluster.VERBOSE_ENV; the CLI does not import Ray)
VERBOSE_ENV = "SARJEPA_VERBOSE"
EXIT_INTERRUPTED = 130


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see jobs/*.yaml); defaults apply to missing keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set train.steps=200")


_VERBOSE_HELP = "debug logging, Ray's own console detail, and the traceback of an error"


def _verbose_parent() -> argparse.ArgumentParser:
    """``-v`` accepted after the subcommand too; SUPPRESS keeps a top-level ``-v`` from being reset."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarjepa", description=__doc__.splitlines()[0],
        epilog="Errors end in one 'sarjepa: error: ...' message; exit status 2 for a wrong command line, "
               "config or job spec, 1 for any other failure (missing input, bad data, storage, refused job).")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    verbose = _verbose_parent()
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub, verbose)
    _add_train_parsers(sub, verbose)
    _add_eval_parsers(sub, verbose)
    _add_cluster_parsers(sub, verbose)
    _add_demo_parser(sub, verbose)
    return parser


def _add_data_parsers(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    _add_ingest_parsers(sub, verbose)
    p = sub.add_parser("synth", parents=[verbose], help="physics-based synthetic SAR chips as shards")
    p.add_argument("dest")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--looks", type=int, default=1)
    p.add_argument("--shard-mib", type=float, default=128.0)

    p = sub.add_parser("inspect", parents=[verbose], help="describe a dataset, checkpoint, export or few-shot report")
    p.add_argument("artefact", help="a dataset, run folder, checkpoint, export, few-shot report or sweep")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="where a run's or checkpoint's learning-curve plot goes (default: ./<run>-curves.png)")


def _add_ingest_parsers(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    ingest = sub.add_parser("ingest", parents=[verbose], help="turn images, arrays or scenes into chip shards")
    isub = ingest.add_subparsers(dest="ingest_kind", required=True)
    cluster = argparse.ArgumentParser(add_help=False, parents=[verbose])
    cluster.add_argument("--ray-address", default=None, metavar="ADDRESS",
                         help="run as a Ray job on this cluster ('local': a new one on this machine); "
                              "default: RAY_ADDRESS if set, else in this process")
    common = argparse.ArgumentParser(add_help=False, parents=[cluster])
    common.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of chips is bad (default 0.01)")
    common.add_argument("--shard-mib", type=float, default=128.0, help="target Parquet shard size (MiB)")
    p = isub.add_parser("images", parents=[common], help="class-per-folder images, centre-cropped to N×N")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--size", type=int, required=True, help="crop every chip to SIZE×SIZE (pads smaller ones)")
    p.add_argument("--sensor", default=None)
    p = isub.add_parser("arrays", parents=[common], help=".npy/.npz chip stacks")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--chips-key", default="chips")
    p.add_argument("--labels-key", default="labels")
    p = isub.add_parser("scene", parents=[cluster],
                        help="tile a large scene (GeoTIFF/TIFF/.npy, magnitude or complex)")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--tile", type=int, required=True)
    p.add_argument("--stride", type=int, default=None, help="default: the tile size (no overlap)")
    p.add_argument("--max-nodata-fraction", type=float, default=0.5)
    p.add_argument("--nodata-value", type=float, default=0.0)
    p.add_argument("--shard-mib", type=float, default=128.0)


def _add_train_parsers(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pretrain", parents=[verbose], help="JEPA pretraining with Ray Train")
    _config_args(p)
    p = sub.add_parser("export", parents=[verbose], help="export a checkpoint's EMA encoder (safetensors + JSON)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (<train.storage_path>/<train.name>): "
                                      "its latest checkpoint")
    p.add_argument("out")


def _add_eval_parsers(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sweep", parents=[verbose],
                       help="Ray Tune sweep over any config keys, stopped early (ASHA) on the online probe")
    _config_args(p)
    p = sub.add_parser("pipeline", parents=[verbose],
                       help="sweep → full pretraining with the best point → few-shot report")
    _config_args(p)
    p = sub.add_parser("fewshot", parents=[verbose], help="few-shot evaluation of encoders")
    _config_args(p)


_ADDRESS_HELP = "the Ray job server (dashboard) URL; default: the spec's address, RAY_ADDRESS, http://127.0.0.1:8265"


def _add_cluster_parsers(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("submit", parents=[verbose], help="submit a job spec (jobs/*.job.yaml) to a Ray cluster as a Ray Job")
    p.add_argument("spec", help="job spec YAML with 'name', 'command' and 'config' (see jobs/pretrain.job.yaml)")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="add an override to the spec's 'set' list")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    p = sub.add_parser("jobs", parents=[verbose], help="list, inspect, follow or stop Ray Jobs on a cluster")
    jsub = p.add_subparsers(dest="jobs_action", required=True)
    jp = jsub.add_parser("list", help="every job on the cluster")
    jp.add_argument("--address", default=None, help=_ADDRESS_HELP)
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        jp = jsub.add_parser(action, help=text)
        jp.add_argument("job_id", metavar="ID", help="the submission id that `sarjepa submit` printed")
        jp.add_argument("--address", default=None, help=_ADDRESS_HELP)
        if action == "logs":
            jp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit with its status")


def _add_demo_parser(sub: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[verbose],
                       help="the whole path on built-in data: synth → sweep → best point pretrained → few-shot")
    p.add_argument("--out", default="demo_out", help="where data, runs and reports go")
    p.add_argument("--quick", action="store_true", help="smallest settings (smoke test)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if not sys.stderr.isatty() or not args.verbose:
        # Ray Data redraws its progress bars with cursor-control sequences: noise in a log file,
        # and beside the project's progress line. Read by Ray after this point (no command has
        # imported Ray yet); a value the user set wins.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours every worker's log prefix
    command_line = ["sarjepa", *(sys.argv[1:] if argv is None else list(argv))]
    try:
        return _HANDLERS[args.command](args, command_line)
    except KeyboardInterrupt:
        print("sarjepa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        failure = expected_failure(exc)
        if failure is None:
            raise
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"sarjepa: error: {storage.redact(str(failure)) or type(failure).__name__}", file=sys.stderr)
        return failure.exit_code if isinstance(failure, SarjepaError) else EXIT_FAILURE


def expected_failure(exc: BaseException) -> BaseException | None:
    """The failure a user can act on behind ``exc``, or None when ``exc`` is a bug.

    That is ``exc`` itself when it is a ``SarjepaError`` or an ``OSError`` (files, storage, network),
    else the first such failure inside Ray's wrappers: a remote task's ``cause``, Ray Train's
    ``worker_failures`` (rank -> exception) or ``controller_failure``. A wrapper's own text holds
    the remote traceback, so the wrapped failure is what gets reported.
    """
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                 *(getattr(current, "worker_failures", None) or {}).values()]
        inner = [e for e in inner if isinstance(e, BaseException)]
        if not inner and isinstance(current, (SarjepaError, OSError)):
            return current
        pending.extend(inner)
    return None


_Handler = Callable[[argparse.Namespace, list[str]], int]

# One handler per command: it loads the config where the command takes one, calls one runner and
# prints its result. Each imports its runner itself, so that importing the CLI does not import Ray.


def _ingest(args: argparse.Namespace, command_line: list[str]) -> int:
    import contextlib

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        from sarjepa_dist.data.ingest.distributed import ray_ingest

        where: contextlib.AbstractContextManager = ray_ingest(address)
    else:
        where = contextlib.nullcontext()
    with where:
        return _run_ingest(args, command_line)


def _run_ingest(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.data import ingest

    if args.ingest_kind == "images":
        rep = ingest.ingest_images(args.src, args.dest, args.size, max_bad_fraction=args.max_bad_fraction,
                                   target_shard_mib=args.shard_mib, sensor=args.sensor, command=command_line)
    elif args.ingest_kind == "arrays":
        rep = ingest.ingest_arrays(args.src, args.dest, size=args.size, chips_key=args.chips_key,
                                   labels_key=args.labels_key, max_bad_fraction=args.max_bad_fraction,
                                   target_shard_mib=args.shard_mib, command=command_line)
    else:
        rep = ingest.ingest_scene(args.src, args.dest, tile=args.tile, stride=args.stride or args.tile,
                                  max_nodata_fraction=args.max_nodata_fraction,
                                  nodata_value=args.nodata_value, target_shard_mib=args.shard_mib,
                                  command=command_line)
    print(f"wrote {rep.num_good} chips to {rep.dest} ({rep.num_bad} quarantined"
          f"{', ' + json.dumps(rep.bad_by_reason) if rep.bad_by_reason else ''}; {rep.num_padded} padded)")
    return 0


def _synth(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(num_classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed,
                      looks=args.looks)
    manifest = write_synthetic_dataset(args.dest, cfg, target_shard_mib=args.shard_mib, command=command_line)
    print(f"wrote {manifest.num_chips} synthetic chips ({len(manifest.class_names)} classes) to {args.dest}")
    return 0


def _inspect(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.lineage import describe, format_description

    info = describe(args.artefact)
    print(json.dumps(info, indent=2, default=str) if args.json else format_description(info))
    if info.get("history"):
        from sarjepa_dist.train.history import plot_curve

        name = info.get("run_name") or "run"
        dest = args.plot or f"{name}-curves.png"
        plot_curve(info["history"], dest, title=f"{name} ({storage.redact(info['uri'])})")
        print(f"wrote the learning curves (probe accuracy, loss, effective ranks) to {storage.redact(dest)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _export(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.train.export import export_checkpoint, find_checkpoint

    choice = find_checkpoint(args.checkpoint)
    if choice.run_uri is not None:
        print(f"{storage.redact(choice.run_uri)} is a run folder: exporting its latest checkpoint "
              f"{storage.redact(choice.uri)} (step {choice.step}, the latest of "
              f"{choice.complete_checkpoints} complete checkpoint(s))")
    out = export_checkpoint(choice.uri, args.out)
    print(f"exported EMA encoder of {storage.redact(choice.uri)} to {storage.redact(out)}")
    return 0


def _with_config(run: Callable[[Config], str]) -> _Handler:
    """The handler of a command that takes a config: load it (before ``run`` imports Ray), run, print."""
    def handler(args: argparse.Namespace, command_line: list[str]) -> int:
        cfg = load_config(args.config, args.overrides)
        print(run(cfg))
        return 0
    return handler


@_with_config
def _pretrain(cfg: Config) -> str:
    from sarjepa_dist.train.runner import run_pretrain

    result = run_pretrain(cfg)
    return f"pretraining {result.name}: step {result.final_step}, latest checkpoint {result.latest_checkpoint_uri}"


@_with_config
def _sweep(cfg: Config) -> str:
    from sarjepa_dist.tune import run_sweep

    result = run_sweep(cfg)
    return result.table_text + "\n" + "\n".join(f"{name}: {storage.redact(uri)}" for name, uri in result.outputs.items())


@_with_config
def _pipeline(cfg: Config) -> str:
    from sarjepa_dist.pipeline import run_pipeline

    result = run_pipeline(cfg)
    return (f"{result.sweep.table_text}\nbest configuration: {storage.redact(result.sweep.outputs['best.yaml'])}\n"
            f"full run ({result.best_config.train.steps} steps): {storage.redact(result.checkpoint)}\n"
            f"few-shot report: {storage.redact(result.report_uri)}\npipeline record: {storage.redact(result.record_uri)}")


@_with_config
def _fewshot(cfg: Config) -> str:
    from sarjepa_dist.fewshot.runner import run_fewshot

    return f"few-shot report: {run_fewshot(cfg).report_uri}"


def _submit(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.jobs import submit_job_spec

    return submit_job_spec(args.spec, address=args.address, wait=args.wait, overrides=args.overrides)


def _jobs(args: argparse.Namespace, command_line: list[str]) -> int:
    from sarjepa_dist.jobs import jobs_command

    return jobs_command(args.jobs_action, getattr(args, "job_id", None), address=args.address,
                        follow=getattr(args, "follow", False))


def _demo(args: argparse.Namespace, command_line: list[str]) -> int:
    # The demo's Ray cluster is for this machine alone: keep its processes on loopback. Ray
    # reads this flag (its single-host switch) at import, so set it before anything imports ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from sarjepa_dist.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


_HANDLERS: dict[str, _Handler] = {
    "ingest": _ingest, "synth": _synth, "inspect": _inspect,
    "pretrain": _pretrain, "export": _export,
    "sweep": _sweep, "pipeline": _pipeline, "fewshot": _fewshot,
    "submit": _submit, "jobs": _jobs,
    "demo": _demo,
}


if __name__ == "__main__":
    sys.exit(main())
