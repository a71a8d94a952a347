"""`clipforge demo-data`: the offline demo dataset, written to a folder for inspection.

    DIR/images/<key>.png       the training images
    DIR/urls.parquet           url, caption, label, classname (urls point at --port on 127.0.0.1)
    DIR/evalsets/demo/         held-out zero-shot eval set, CLIP_benchmark wds layout

With --serve it then serves DIR/images on 127.0.0.1:--port until Ctrl-C, so
`clipforge download --url-list DIR/urls.parquet` can fetch them. `clipforge download --demo`
does all of this in one step, in memory, on an ephemeral port.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from stages.common import storage
from stages.common.cli import stage_main
from stages.common.errors import ConfigError
from stages.common.logs import setup_logging
from stages.download.demo_images import CLASSNAMES, EVAL_TEMPLATES, DemoSample, sample
from stages.download.demo_server import ImageServer
from stages.download.evalset import write_zeroshot_wds

log = logging.getLogger("clipforge.demo-data")


def train_samples(n: int, seed: int, size: int) -> list[DemoSample]:
    return [sample(i, seed, size, prefix="train") for i in range(n)]


def eval_samples(n: int, seed: int, size: int) -> list[DemoSample]:
    """Drawn from their own random stream, so no eval image is a training image."""
    return [sample(i, seed, size, prefix="eval") for i in range(n)]


def image_files(samples: list[DemoSample]) -> dict[str, bytes]:
    return {f"/images/{s.key}.png": s.png for s in samples}


def url_table_parquet(samples: list[DemoSample], base_url: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [f"{base_url}/images/{s.key}.png" for s in samples],
                      "caption": [s.caption for s in samples],
                      "label": [s.label for s in samples],
                      "classname": [s.classname for s in samples]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_eval_set(out_dir: str, n: int, seed: int, size: int) -> list[str]:
    return write_zeroshot_wds(out_dir, CLASSNAMES, EVAL_TEMPLATES, eval_samples(n, seed, size))


@dataclass
class DemoDataConfig:
    """Write the offline demo dataset (images, URL list, eval set) to a folder; optionally serve it."""

    output: str = field(default="", metadata={"help": "folder to write to (local path or any URI)"})
    samples: int = field(default=4000, metadata={"help": "training images"})
    eval_samples: int = field(default=600, metadata={"help": "held-out eval images"})
    seed: int = field(default=0, metadata={"help": "seed; the same seed gives the same bytes"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels"})
    port: int = field(default=8765, metadata={"help": "port the URLs in urls.parquet point at"})
    serve: bool = field(default=False, metadata={
        "help": "after writing, serve the images on 127.0.0.1:--port until Ctrl-C"})
    log_level: str = field(default="INFO", metadata={"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("--output is required: the folder to write the demo data to")
        for flag, value in (("--samples", self.samples), ("--eval-samples", self.eval_samples),
                            ("--image-size", self.image_size)):
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a port number (1-65535)")


def write_demo(cfg: DemoDataConfig) -> dict[str, bytes]:
    samples = train_samples(cfg.samples, cfg.seed, cfg.image_size)
    files = image_files(samples)
    for path, data in files.items():
        storage.write_bytes(storage.join(cfg.output, path), data)
    urls = storage.join(cfg.output, "urls.parquet")
    storage.write_bytes(urls, url_table_parquet(samples, f"http://127.0.0.1:{cfg.port}"))
    write_eval_set(storage.join(cfg.output, "evalsets", "demo"), cfg.eval_samples, cfg.seed,
                   cfg.image_size)
    log.info("wrote %d images, %s and the eval set (%d images) to %s", len(samples), urls,
             cfg.eval_samples, cfg.output)
    return files


def run(cfg: DemoDataConfig) -> int:
    setup_logging("demo-data", "-", level=cfg.log_level)
    files = write_demo(cfg)
    if cfg.serve:
        server = ImageServer(files, port=cfg.port)
        print(f"serving {len(files)} images on {server.base_url}/images/ (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # the documented way to stop serving, not a failure
            pass
        finally:
            server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("demo-data", DemoDataConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
