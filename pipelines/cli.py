"""`clipforge pipeline compile|submit|run|render-k8s`."""

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipelines.images import DEFAULT_REGISTRY, DEFAULT_TAG
from pipelines.local import DEMO_DEFAULTS
from pipelines.params import add_param_flags, given_params

DEFAULT_OUTPUT = "pipelines/clip_pipeline.yaml"


def _image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default="", help=f"image registry (default: $CLIPFORGE_REGISTRY "
                                                       f"or {DEFAULT_REGISTRY})")
    parser.add_argument("--tag", default="", help=f"image tag (default: $CLIPFORGE_TAG or {DEFAULT_TAG})")
    parser.add_argument("--image-pull-policy", default="IfNotPresent",
                        choices=["Always", "IfNotPresent", "Never"])
    parser.add_argument("--gpu-node-selector", action="append", default=[], metavar="KEY=VALUE",
                        help="node label the evaluate step needs (repeatable), e.g. nvidia.com/gpu.present=true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile the pipeline to a YAML package")
    comp.add_argument("--output", default=DEFAULT_OUTPUT)
    _image_flags(comp)
    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default="clipforge")
    submit.add_argument("--run-name", default="")
    submit.add_argument("--service-account", default=None,
                        help="the run's service account (default: the installation's pipeline runner); it needs "
                             "no clipforge rights: the train step alone mounts the launcher's token")
    submit.add_argument("--package", default="", help="a compiled pipeline YAML (default: compile now)")
    submit.add_argument("--kfp-namespace", default=None,
                        help="Kubeflow profile namespace of the run (multi-user installs)")
    submit.add_argument("--cache", action="store_true",
                        help="let KFP reuse cached step results for every step, overriding the compiled "
                             "pipeline, where no step is cached (a rerun would then hand back old outputs)")
    _image_flags(submit)
    add_param_flags(submit)
    run = sub.add_parser("run", help="run the whole pipeline on this machine through kfp.local")
    run.add_argument("--local", action="store_true", required=True,
                     help="run here (kfp.local SubprocessRunner, torchrun instead of a PyTorchJob)")
    run.add_argument("--local-outputs", default="",
                     help="kfp.local's pipeline root (default: {root}/.kfp-local)")
    add_param_flags(run, defaults=DEMO_DEFAULTS)
    render = sub.add_parser("render-k8s", help="rewrite k8s/ from pipelines/presets.py")
    render.add_argument("--check", action="store_true", help="only report whether k8s/ is up to date")
    return parser


def _selector(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE flags into the one node-selector format, a dict of labels."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"clipforge pipeline: --gpu-node-selector {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _compile(args, output: str) -> None:
    from kfp import compiler

    from pipelines.pipeline import build_pipeline

    pipeline = build_pipeline(args.registry, args.tag, args.image_pull_policy,
                              _selector(args.gpu_node_selector))
    compiler.Compiler().compile(pipeline, output)


def _submit(args) -> int:
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or str(Path(tmp) / "clip_pipeline.yaml")
        if not args.package:
            _compile(args, package)
        client = kfp.Client(host=args.host)
        result = client.create_run_from_pipeline_package(
            package, arguments=given_params(args), experiment_name=args.experiment,
            run_name=args.run_name or None, service_account=args.service_account,
            namespace=args.kfp_namespace, enable_caching=True if args.cache else None)
    print(f"submitted run {result.run_id} to {args.host} (experiment {args.experiment})")
    return 0


def _run_local(args) -> int:
    from pipelines.local import report, run_local

    uris = run_local(given_params(args), args.local_outputs)
    print(report(uris))
    return 0


def _render(args) -> int:
    from pipelines import manifests

    if args.check:
        stale = [str(rel) for rel, text in manifests.rendered().items()
                 if not (manifests.K8S_DIR / rel).is_file() or (manifests.K8S_DIR / rel).read_text() != text]
        print("k8s/ is stale: " + ", ".join(stale) if stale else "k8s/ is up to date")
        return 1 if stale else 0
    for path in manifests.write():
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compile":
        _compile(args, args.output)
        print(f"wrote {args.output}")
        return 0
    return {"submit": _submit, "run": _run_local, "render-k8s": _render}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
