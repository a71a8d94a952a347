"""`clipforge download` options. img2dataset's options keep img2dataset's names."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError
from stages.download.split import parse_proportions
from stages.download.urllist import FORMATS

RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height",
                    "status", "error_message", "exif", "md5", "sha256", "sha512"}
RESIZE_MODES = ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
DEFAULT_IMAGE_SIZE, DEMO_IMAGE_SIZE = 256, 64
HASHES = ["md5", "sha256", "sha512", "none"]
DISTRIBUTORS = ["multiprocessing", "pyspark", "ray"]
# img2dataset options without a flag of their own, set with --img2dataset-option NAME=VALUE.
PASS_THROUGH = {"upscale_interpolation": str, "downscale_interpolation": str,
                "disable_all_reencoding": bool, "subjob_size": int}


@dataclass
class DownloadConfig(CommonConfig):
    """Download a URL list into webdataset shards with img2dataset, then write data/manifest.json."""

    url_list: list[str] = field(default_factory=list, metadata={
        "help": "URL list: files, folders or glob patterns (any fsspec URI) of parquet, csv, tsv, "
                "jsonl or txt (optionally .gz) files"})
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
    bbox_col: str = field(default="", metadata={
        "help": "column of face boxes [[x0, y0, x1, y1], ...] (fractions of the image) to blur, "
                "as DataComp's face_bboxes"})
    min_image_size: int = field(default=0, metadata={"help": "drop images whose shorter side is smaller"})
    max_image_area: float = field(default=0.0, metadata={
        "help": "drop images with more pixels than this (0: no limit)"})
    max_aspect_ratio: float = field(default=0.0, metadata={
        "help": "drop images whose longer/shorter side ratio is larger (0: no limit)"})
    resize_only_if_bigger: bool = field(default=False, metadata={
        "help": "resize only images larger than --image-size"})
    skip_reencode: bool = field(default=False, metadata={
        "help": "keep the original bytes of images that need no resizing"})
    compute_hash: str = field(default="sha256", metadata={
        "choices": HASHES, "help": "hash of each image's bytes saved in its .json"})
    verify_hash: str = field(default="", metadata={
        "help": "column holding the expected --compute-hash of each image; mismatches fail"})
    user_agent_token: str = field(default="", metadata={
        "help": "token added to the User-Agent and matched against X-Robots-Tag"})
    disallowed_header_directives: list[str] = field(default_factory=lambda: [
        "noai", "noimageai", "noindex", "noimageindex"], metadata={
        "help": "X-Robots-Tag directives that forbid using an image ('none' to ignore the header)"})
    extract_exif: bool = field(default=True, metadata={"help": "save each image's EXIF in its .json"})
    max_shard_retry: int = field(default=1, metadata={"help": "times a failed shard is retried"})
    distributor: str = field(default="multiprocessing", metadata={
        "choices": DISTRIBUTORS, "help": "how img2dataset spreads shards over processes"})
    enable_wandb: bool = field(default=False, metadata={
        "help": "log img2dataset's progress to Weights & Biases (WANDB_* env applies)"})
    wandb_project: str = field(default="img2dataset", metadata={"help": "wandb project"})
    img2dataset_option: list[str] = field(default_factory=list, metadata={
        "help": f"other img2dataset options as NAME=VALUE ({', '.join(sorted(PASS_THROUGH))})"})
    allow_private_networks: bool = field(default=False, metadata={
        "help": "fetch from loopback, private and link-local addresses too (the demo and tests)"})
    max_response_bytes: int = field(default=32 << 20, metadata={
        "help": "refuse an image whose response is larger than this many bytes"})
    max_download_seconds: float = field(default=60.0, metadata={
        "help": "refuse an image whose download (connect to last byte, redirects included) takes longer"})
    num_parts: int = field(default=1, metadata={
        "help": "split the list into this many parts, each downloaded by its own task"})
    part_index: str = field(default="", metadata={
        "help": "the part this task downloads (0-based), or 'auto': $JOB_COMPLETION_INDEX"})
    merge_parts: int = field(default=0, metadata={
        "help": "download nothing: merge the manifests of this many finished parts into manifest.json"})
    check_input: bool = field(default=False, metadata={
        "help": "check the URL list (streaming), print its files, rows, shards and parts, and exit"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val split of the shards"})
    split_proportions: str = field(default="train=0.99,val=0.01", metadata={
        "help": "name=fraction pairs summing to 1; whole shards go to each split (each named split gets at least one)"})
    min_success_rate: float = field(default=0.5, metadata={
        "help": "publish no manifest.json (and fail) when fewer than this fraction of the URLs arrive"})
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
        if isinstance(self.url_list, str):  # a YAML config may give one URI
            self.url_list = [self.url_list] if self.url_list else []
        if self.merge_parts:
            self._validate_merge()
        elif self.demo == bool(self.url_list):
            raise ConfigError("give exactly one of --url-list URI or --demo")
        self._validate_parts()
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
        self.passed_through = parse_pass_through(self.img2dataset_option)
        if self.verify_hash and self.compute_hash == "none":
            raise ConfigError("--verify-hash needs --compute-hash md5, sha256 or sha512")

    def _validate_merge(self) -> None:
        if self.url_list or self.demo:
            raise ConfigError("--merge-parts downloads nothing: drop --url-list/--demo (the parts "
                              "recorded their input)")
        if self.merge_parts < 1:
            raise ConfigError(f"--merge-parts {self.merge_parts} must be at least 1")

    def _validate_parts(self) -> None:
        if self.num_parts < 1:
            raise ConfigError(f"--num-parts {self.num_parts} must be at least 1")
        if self.num_parts > 1 and not self.part_index:
            raise ConfigError(f"--num-parts {self.num_parts} needs --part-index (0..{self.num_parts - 1} "
                              "or auto)")
        if self.part_index and self.merge_parts:
            raise ConfigError("--merge-parts merges finished parts: drop --part-index")

    def _check_ranges(self) -> None:
        positive = {"--image-size": self.image_size, "--max-response-bytes": self.max_response_bytes,
                    "--max-download-seconds": self.max_download_seconds, "--samples-per-shard": self.samples_per_shard,
                    "--processes": self.processes, "--threads": self.threads,
                    "--timeout": self.timeout, "--demo-samples": self.demo_samples,
                    "--demo-eval-samples": self.demo_eval_samples}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")
        for flag, value in (("--min-image-size", self.min_image_size),
                            ("--max-image-area", self.max_image_area),
                            ("--max-aspect-ratio", self.max_aspect_ratio),
                            ("--max-shard-retry", self.max_shard_retry)):
            if value < 0:
                raise ConfigError(f"{flag} {value} must not be negative")
        if self.retries < 0:
            raise ConfigError(f"--retries {self.retries} must not be negative")
        if not 0 <= self.min_success_rate <= 1:
            raise ConfigError(f"--min-success-rate {self.min_success_rate} is not between 0 and 1")
        if not 0 <= self.encode_quality <= 100:
            raise ConfigError(f"--encode-quality {self.encode_quality} is not between 0 and 100")
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ConfigError(f"--encode-format png takes --encode-quality 0-9 (the compression level), "
                              f"not {self.encode_quality}")


def parse_pass_through(items: list[str]) -> dict:
    """--img2dataset-option NAME=VALUE pairs → img2dataset keyword arguments, typed and checked."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in PASS_THROUGH:
            raise ConfigError(f"--img2dataset-option {item!r}: expected NAME=VALUE with NAME one of "
                              f"{', '.join(sorted(PASS_THROUGH))} (the others have flags of their own)")
        value = yaml.safe_load(text) if text.strip() else ""
        if not isinstance(value, PASS_THROUGH[name]) or isinstance(value, bool) != (PASS_THROUGH[name] is bool):
            raise ConfigError(f"--img2dataset-option {item!r}: {name} takes a "
                              f"{PASS_THROUGH[name].__name__}")
        out[name] = value
    return out
