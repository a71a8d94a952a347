"""`clipforge download` options. img2dataset's options keep img2dataset's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError
from stages.download.split import parse_proportions
from stages.download.urllist import FORMATS

RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height",
                    "status", "error_message", "exif", "md5", "sha256", "sha512"}
RESIZE_MODES = ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
DEFAULT_IMAGE_SIZE, DEMO_IMAGE_SIZE = 256, 64


@dataclass
class DownloadConfig(CommonConfig):
    """Download a URL list into webdataset shards with img2dataset, then write data/manifest.json."""

    url_list: str = field(default="", metadata={
        "help": "URL list (any fsspec URI) in parquet, csv, tsv, jsonl or txt (optionally .gz)"})
    input_format: str = field(default="", metadata={
        "help": f"format of --url-list ({', '.join(FORMATS)}); default: from its name"})
    url_col: str = field(default="url", metadata={"help": "column holding the image URLs"})
    caption_col: str = field(default="caption", metadata={
        "help": "column holding the captions ('' for none)"})
    save_additional_columns: list[str] = field(default_factory=list, metadata={
        "help": "other columns to keep in each sample's .json; default: all of them"})
    image_size: int = field(default=0, metadata={
        "help": f"image side in pixels (default: {DEFAULT_IMAGE_SIZE}; {DEMO_IMAGE_SIZE} with --demo)"})
    resize_mode: str = field(default="border", metadata={"choices": RESIZE_MODES,
                                                         "help": "img2dataset resize mode"})
    encode_format: str = field(default="jpg", metadata={"choices": ["jpg", "png", "webp"],
                                                        "help": "image format in the shards"})
    encode_quality: int = field(default=95, metadata={"help": "jpg/webp quality (png: compression 0-9)"})
    samples_per_shard: int = field(default=10000, metadata={"help": "URLs per shard"})
    processes: int = field(default=1, metadata={"help": "download processes"})
    threads: int = field(default=64, metadata={"help": "download threads per process"})
    retries: int = field(default=0, metadata={"help": "retries per URL"})
    timeout: int = field(default=10, metadata={"help": "seconds before a URL times out"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val split of the shards"})
    split_proportions: str = field(default="train=0.99,val=0.01", metadata={
        "help": "name=fraction pairs summing to 1; whole shards go to each split (each named split gets at least one)"})
    min_success_rate: float = field(default=0.0, metadata={
        "help": "fail the stage when fewer than this fraction of the URLs arrive"})
    demo: bool = field(default=False, metadata={
        "help": "download the generated demo dataset from a loopback server instead of --url-list, "
                "and write the demo eval set to {run}/evalsets/demo/"})
    demo_samples: int = field(default=4000, metadata={"help": "images in the demo dataset"})
    demo_eval_samples: int = field(default=600, metadata={"help": "images in the held-out demo eval set"})
    demo_seed: int = field(default=0, metadata={"help": "seed of the demo dataset"})

    @property
    def data_dir(self) -> str:
        return f"{self.run_dir}/data"

    def validate(self) -> None:
        if self.demo == bool(self.url_list):
            raise ConfigError("give exactly one of --url-list URI or --demo")
        if not self.image_size:
            self.image_size = DEMO_IMAGE_SIZE if self.demo else DEFAULT_IMAGE_SIZE
        self.split = parse_proportions(self.split_proportions)
        self._check_ranges()
        reserved = RESERVED_COLUMNS.intersection(self.save_additional_columns)
        if reserved:
            raise ConfigError(f"--save-additional-columns: {sorted(reserved)} are img2dataset's own "
                              "fields; they are always saved")
        if not self.url_col:
            raise ConfigError("--url-col is empty: name the column holding the image URLs")

    def _check_ranges(self) -> None:
        positive = {"--image-size": self.image_size, "--samples-per-shard": self.samples_per_shard,
                    "--processes": self.processes, "--threads": self.threads,
                    "--timeout": self.timeout, "--demo-samples": self.demo_samples,
                    "--demo-eval-samples": self.demo_eval_samples}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")
        if self.retries < 0:
            raise ConfigError(f"--retries {self.retries} must not be negative")
        if not 0 <= self.min_success_rate <= 1:
            raise ConfigError(f"--min-success-rate {self.min_success_rate} is not between 0 and 1")
        if not 0 <= self.encode_quality <= 100:
            raise ConfigError(f"--encode-quality {self.encode_quality} is not between 0 and 100")
