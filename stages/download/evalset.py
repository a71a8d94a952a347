"""Write a zero-shot classification eval set in CLIP_benchmark's `wds` layout.

    classnames.txt, zeroshot_classification_templates.txt ({c} marks the class name),
    dataset_type.txt, test/nshards.txt, test/{i}.tar with <key>.png and <key>.cls
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable

from stages.common import storage
from stages.download.demo_images import DemoSample


def _tar(samples: list[DemoSample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in (("png", s.png), ("cls", str(s.label).encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_zeroshot_wds(out_dir: str, classnames: list[str], templates: Iterable[str],
                       samples: list[DemoSample], samples_per_shard: int = 1000) -> list[str]:
    """Write the eval set; returns the URIs of its test shards."""
    storage.write_text(storage.join(out_dir, "classnames.txt"), "\n".join(classnames) + "\n")
    storage.write_text(storage.join(out_dir, "zeroshot_classification_templates.txt"),
                       "\n".join(templates) + "\n")
    storage.write_text(storage.join(out_dir, "dataset_type.txt"), "zeroshot_classification\n")
    chunks = [samples[i:i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    uris = []
    for i, chunk in enumerate(chunks):
        uri = storage.join(out_dir, "test", f"{i}.tar")
        storage.write_bytes(uri, _tar(chunk))
        uris.append(uri)
    storage.write_text(storage.join(out_dir, "test", "nshards.txt"), f"{len(chunks)}\n")
    return uris
