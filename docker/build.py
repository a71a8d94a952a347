"""Build the four stage images without a registry: bootstrapped base, wheelhouse, Docker engine.

    python3 docker/build.py [--base-image IMAGE] [--wheelhouse DIR] [--registry R] [--tag T] [--push]

- Base: `--base-image` names one the engine already has or can pull; without it a Debian bookworm
  base with Python is bootstrapped from Debian's packages (debootstrap) and imported as
  `clipforge-base:bookworm`, so nothing is pulled from a container registry.
- Packages: `--wheelhouse DIR` holds the wheels (made here with `pip wheel` from constraints.txt when
  the folder is empty, or carried in for an air-gapped build). It is served on 127.0.0.1 for the
  build only, and the builds run with `--network host` to reach it.
- Engine: the one $DOCKER_HOST (or the default socket) reaches; `--engine-dir DIR` starts a private
  `dockerd` (data under DIR) as root and stops it afterwards by its pid.

Prints a JSON report: seconds and bytes per image. Kept as a script rather than Makefile shell so
the tests drive exactly what `make images` does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docker"))
from deps import requirements  # noqa: E402

STAGES = ("download", "train", "evaluate", "export")
BOOTSTRAP_TAG = "clipforge-base:bookworm"
BOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"
# Everything the images install: each stage's extras, kfp (every step function runs in its image)
# and the build backend that installs clipforge itself.
WHEELHOUSE_EXTRAS = ("core", "download", "train", "evaluate", "export", "pipeline")
BUILD_REQUIREMENTS = ("kfp", "setuptools>=68", "wheel")


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, capture: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, text=True,
                          capture_output=capture, **kw)


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False, capture=True).returncode == 0


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", name, capture=True).stdout.strip())


def debian_mirror() -> str:
    """The mirror apt already uses here (deb822 or one-line sources), else Debian's CDN."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 1):
                uri = words[1] if words[0] == "URIs:" else next(w for w in words[1:] if "://" in w)
                if "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def bootstrap_base(tag: str = BOOTSTRAP_TAG, mirror: str = "") -> str:
    """Debian bookworm (minbase) with Python, from Debian's packages, imported as `tag`."""
    if image_exists(tag):
        return tag
    if not shutil.which("debootstrap"):
        raise SystemExit("debootstrap is not installed (Debian package `debootstrap`); "
                         "or pass --base-image with a base the engine has")
    with tempfile.TemporaryDirectory(prefix="clipforge-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"bootstrapping Debian bookworm from {mirror or debian_mirror()}")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BOOTSTRAP_PACKAGES}", "bookworm",
                        str(rootfs), mirror or debian_mirror()], check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        docker("import", "--change", "ENV LANG=C.UTF-8", "-", tag, stdin=tar.stdout, capture=True)
        if tar.wait() != 0:
            raise SystemExit("tar of the bootstrapped base failed")
    return tag


def wheel_requirements() -> list[str]:
    return list(dict.fromkeys([*requirements(list(WHEELHOUSE_EXTRAS)), *BUILD_REQUIREMENTS]))


def make_wheelhouse(folder: Path) -> Path:
    """Wheels for every image's packages, at constraints.txt's versions; kept if already there."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".complete"
    wanted = hashlib.sha256("\n".join([(REPO / "constraints.txt").read_text(), *wheel_requirements()])
                            .encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return folder
    log(f"making the wheelhouse in {folder}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(folder),
                    "-c", str(REPO / "constraints.txt"), *wheel_requirements()], check=True, cwd=REPO)
    stamp.write_text(wanted + "\n")  # what it was made for: a new pin makes it again
    return folder


@contextlib.contextmanager
def serve(folder: Path):
    """The wheelhouse as a directory listing on 127.0.0.1 (what pip's --find-links reads)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def image_name(stage: str, registry: str, tag: str) -> str:
    return f"{registry.rstrip('/')}/clipforge-{stage}:{tag}"


def build(stage: str, name: str, base: str, wheelhouse_url: str) -> float:
    started = time.monotonic()
    args = ["build", "--network", "host", "-f", f"docker/{stage}.Dockerfile", "-t", name,
            "--build-arg", f"BASE_IMAGE={base}"]
    if wheelhouse_url:
        args += ["--build-arg", f"WHEELHOUSE={wheelhouse_url}"]
    log(f"building {name}")
    proc = docker(*args, ".", check=False, capture=True, cwd=REPO,
                  env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"docker build of {stage} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    seconds = round(time.monotonic() - started, 1)
    log(f"built {name} in {seconds} s")
    return seconds


def build_images(stages, *, base: str, wheelhouse: Path | None, registry: str, tag: str,
                 push: bool = False) -> dict:
    report = {"base": base, "images": {}}
    with serve(wheelhouse) if wheelhouse else contextlib.nullcontext("") as url:
        for stage in stages:
            name = image_name(stage, registry, tag)
            seconds = build(stage, name, base, url)
            report["images"][stage] = {"image": name, "build_s": seconds, "size_bytes": image_size(name)}
            if push:
                docker("push", name)
    return report


class Engine:
    """A private dockerd (root): own data root, socket and pid file; overlay2, else vfs."""

    def __init__(self, folder: Path, storage_driver: str = "") -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.storage_driver = storage_driver
        self.proc: subprocess.Popen | None = None

    def start(self) -> Engine:
        drivers = [self.storage_driver] if self.storage_driver else ["overlay2", "vfs"]
        for driver in drivers:
            if self._start(driver):
                self.storage_driver = driver
                return self
        raise SystemExit(f"dockerd did not start; see {self.folder / 'dockerd.log'}")

    def _start(self, driver: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = ["dockerd", "--data-root", str(self.folder / "data"), "--exec-root", str(self.folder / "exec"),
               "--pidfile", str(self.folder / "dockerd.pid"), "--host", self.host,
               "--storage-driver", driver, "--iptables=false", "--ip-masq=false", "--ip-forward=false",
               "--bridge=none"]
        with open(self.folder / "dockerd.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._answers():
                return True
            time.sleep(0.5)
        self.stop()
        return False

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
        except OSError:
            return False
        return subprocess.run(["docker", "--host", self.host, "info"], capture_output=True).returncode == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its network namespace (exec/netns/default) mounted: unmount what it left."""
        exec_root = str((self.folder / "exec").resolve())
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1] for line in f]
        except OSError:
            return
        for point in sorted((m for m in mounts if m.startswith(exec_root + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stages", nargs="*", default=list(STAGES), help=f"some of {', '.join(STAGES)} (default: all)")
    p.add_argument("--base-image", default="", help="base with python3 (default: bootstrap Debian bookworm)")
    p.add_argument("--wheelhouse", default="", help="folder of wheels to install from (made if empty)")
    p.add_argument("--registry", default="ghcr.io/clipforge")
    p.add_argument("--tag", default="latest")
    p.add_argument("--push", action="store_true", help="docker push each image after building it")
    p.add_argument("--engine-dir", default="", help="start a private dockerd with its data here")
    p.add_argument("--report", default="", help="also write the JSON report to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    engine = Engine(Path(args.engine_dir).resolve()).start() if args.engine_dir else None
    if engine:
        os.environ["DOCKER_HOST"] = engine.host
    try:
        started = time.monotonic()
        base = args.base_image or bootstrap_base()
        base_s = round(time.monotonic() - started, 1)
        log(f"base {base} ready after {base_s} s")
        wheelhouse = make_wheelhouse(Path(args.wheelhouse).resolve()) if args.wheelhouse else None
        wheelhouse_s = round(time.monotonic() - started - base_s, 1)
        log(f"wheelhouse ready after {wheelhouse_s} s")
        report = build_images(args.stages, base=base, wheelhouse=wheelhouse, registry=args.registry,
                              tag=args.tag, push=args.push)
        report.update(base_s=base_s, base_size_bytes=image_size(base), wheelhouse_s=wheelhouse_s,
                      storage_driver=docker("info", "--format", "{{.Driver}}", capture=True).stdout.strip(),
                      total_s=round(time.monotonic() - started, 1))
    finally:
        if engine:
            engine.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
