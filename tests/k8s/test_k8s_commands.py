"""Every container command in k8s/ parses with its stage's real parser (`--check-config`).

The URIs point at s3://clipforge; the test points them at a fresh bucket on the moto server and
writes shards where the train stage expects them, since its config check opens the manifests.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from k8skit import DIRS, REPO, pod_templates, stage_command


def _make_shards():
    spec = importlib.util.spec_from_file_location("train_shards", REPO / "tests" / "train" / "shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_shards


def _commands(built) -> dict[tuple[str, tuple[str, ...]], str]:
    """Distinct (stage, flags) over all directories, with where each first appears."""
    found = {}
    for rel in DIRS:
        for obj in built[rel]:
            for where, template in pod_templates(obj):
                for container in template["spec"]["containers"]:
                    stage, flags = stage_command(container)
                    found.setdefault((stage, tuple(flags)), f"{rel}: {where}")
    return found


def _make_eval_inputs(argv: list[str], make_shards, made: set) -> None:
    from tests.evaluate.evalkit import write_classification_set

    for i, word in enumerate(argv[:-1]):
        if word == "--eval-data":
            for entry in argv[i + 1].split(","):
                uri = entry.split("=", 1)[-1]
                if uri not in made:
                    write_classification_set(uri)
                    made.add(uri)
        if word == "--val-data" and argv[i + 1] not in made and "://" in argv[i + 1]:
            make_shards(argv[i + 1], n_samples=8, samples_per_shard=8, image_size=32, val_samples=4)
            made.add(argv[i + 1])


def test_every_manifest_command_passes_the_stages_config_check(built, s3, cli_env):
    commands = _commands(built)
    assert {stage for stage, _ in commands} == {"download", "train", "evaluate"}
    make_shards = _make_shards()
    bucket = s3
    made = set()
    for (stage, flags), where in commands.items():
        argv = [f.replace("s3://clipforge", bucket).replace("$(SHARD_INDEX)", "0") for f in flags]
        if stage == "train":
            for source in argv[argv.index("--train-data") + 1].split("::"):
                if source not in made:
                    make_shards(source, n_samples=8, samples_per_shard=8, image_size=32, val_samples=4)
                    made.add(source)
        if stage == "evaluate":  # --check-config reads the first samples of each set: make them
            _make_eval_inputs(argv, make_shards, made)
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *argv, "--check-config"],
                              env=cli_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{where}: clipforge {stage} rejects its flags:\n{proc.stderr[-2000:]}"
        resolved = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert resolved["root"].startswith(bucket), where


def test_config_check_fails_on_a_bad_flag(built, cli_env):
    (job,) = [o for o in built["overlays/cpu-smoke"] if o["kind"] == "PyTorchJob"]
    _, flags = stage_command(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0])
    proc = subprocess.run([sys.executable, "-m", "stages.train", *flags, "--batch-size", "0", "--check-config"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--batch-size" in proc.stderr
