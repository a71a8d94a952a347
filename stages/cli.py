"""`clipforge <command>`: each command loads its stage only when called (stages are heavy)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "download": ("stages.download.cli", "download a URL list into webdataset shards (img2dataset)"),
    "demo-data": ("stages.download.demo", "generate the offline demo dataset and eval set"),
    "train": ("stages.train.cli", "train an open_clip model (torchrun / PyTorchJob)"),
    "evaluate": ("stages.evaluate.cli", "zero-shot classification and retrieval of a checkpoint"),
    "export": ("stages.export.cli", "export a checkpoint in open_clip's Hub layout, optionally push"),
    "pipeline": ("pipelines.cli", "compile, submit or locally run the Kubeflow pipeline"),
}


def usage() -> str:
    lines = ["usage: clipforge <command> [options]   (clipforge <command> --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from stages import __version__

        print(f"clipforge {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"clipforge: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
