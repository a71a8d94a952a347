"""DataComp's evaluation suite: its 38 tasks, where each set lies under a root, and its average.

The task list, the main metric of each task and the average (the mean of the main metrics that
exist; FairFace and UTKFace have none) are DataComp's `tasklist.yml` and `evaluate.py`. DataComp is
not a package, so the list is carried here. Sets are read in CLIP_benchmark's wds layout, in the
folders DataComp's `download_evalsets.py` writes (`wds_<task with / as ->_test`, without the
`fairness/` prefix); the two retrieval sets, which DataComp reads from Hugging Face datasets, are
looked for in the same kind of folder or in CLIP_benchmark's own wds names. WinoGAViL is read from
the Hugging Face datasets cache DataComp's downloader leaves in `<root>/hf_cache`
(stages.evaluate.winogavil).
"""

from __future__ import annotations

import dataclasses

from stages.common import storage
from stages.evaluate import winogavil


@dataclasses.dataclass(frozen=True)
class Task:
    key: str
    name: str
    main_metric: str | None = "acc1"
    aliases: tuple[str, ...] = ()
    hf_cache: bool = False  # read from <root>/hf_cache (a Hugging Face datasets cache), not wds


    @property
    def folder(self) -> str:
        return f"wds_{self.key.removeprefix('fairness/').replace('/', '-')}_test"


MPCR = "mean_per_class_recall"
DATACOMP_TASKS: tuple[Task, ...] = (
    Task("vtab/caltech101", "Caltech-101", MPCR), Task("cifar10", "CIFAR-10"),
    Task("vtab/cifar100", "CIFAR-100"), Task("vtab/clevr_count_all", "CLEVR Counts"),
    Task("vtab/clevr_closest_object_distance", "CLEVR Distance"), Task("country211", "Country211"),
    Task("vtab/dtd", "Describable Textures"), Task("vtab/eurosat", "EuroSAT"),
    Task("fgvc_aircraft", "FGVC Aircraft", MPCR), Task("food101", "Food-101"), Task("gtsrb", "GTSRB"),
    Task("imagenet1k", "ImageNet 1k"), Task("imagenet_sketch", "ImageNet Sketch"),
    Task("imagenetv2", "ImageNet v2"), Task("imagenet-a", "ImageNet-A"), Task("imagenet-o", "ImageNet-O"),
    Task("imagenet-r", "ImageNet-R"), Task("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance"),
    Task("mnist", "MNIST"), Task("objectnet", "ObjectNet"), Task("vtab/flowers", "Oxford Flowers-102", MPCR),
    Task("vtab/pets", "Oxford-IIIT Pet", MPCR), Task("voc2007", "Pascal VOC 2007"),
    Task("vtab/pcam", "PatchCamelyon"), Task("renderedsst2", "Rendered SST2"),
    Task("vtab/resisc45", "RESISC45"), Task("cars", "Stanford Cars"), Task("stl10", "STL-10"),
    Task("sun397", "SUN397"), Task("vtab/svhn", "SVHN"),
    Task("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "mean_recall@1", ("wds_flickr30k",)),
    Task("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1",
         ("wds_mscoco_captions",)),
    Task("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", hf_cache=True),
    Task("wilds/iwildcam", "iWildCam", "F1-macro_all"), Task("wilds/camelyon17", "Camelyon17"),
    Task("wilds/fmow", "FMoW", "acc_worst_region"),
    Task("fairness/dollar_street", "Dollar Street", "acc_top5_wg"), Task("fairness/geode", "GeoDE", "acc_wg"),
    Task("fairness/fairface", "FairFace", None), Task("fairness/utkface", "UTKFace", None),
)
def locate(root: str) -> tuple[list[tuple[Task, str]], list[dict]]:
    """([(task, set URI)] present under root, [{task, name, expected, reason}] for the others)."""
    root = root.rstrip("/")
    present, missing = [], []
    for task in DATACOMP_TASKS:
        if task.hf_cache:
            if winogavil.present(root):
                present.append((task, winogavil.cache_uri(root)))
            else:
                missing.append({"task": task.key, "name": task.name, "reason": "not found",
                                "expected": winogavil.dataset_folder(winogavil.cache_uri(root))})
            continue
        found = next((storage.join(root, f) for f in (task.folder, *task.aliases)
                      if storage.exists(storage.join(root, f, "test"))), None)
        if found:
            present.append((task, found))
        else:
            missing.append({"task": task.key, "name": task.name, "expected": storage.join(root, task.folder),
                            "reason": "not found"})
    return present, missing


def summary(results: dict[str, dict], missing: list[dict]) -> dict:
    """Per-task rows (main metric and its value) and DataComp's average over the tasks run."""
    rows, values = [], []
    for task in DATACOMP_TASKS:
        if task.key not in results:
            continue
        value = results[task.key]["metrics"].get(task.main_metric) if task.main_metric else None
        rows.append({"task": task.key, "name": task.name, "main_metric": task.main_metric, "value": value})
        if value is not None:
            values.append(value)
    return {"name": "datacomp", "tasks": rows, "average": sum(values) / len(values) if values else None,
            "averaged_tasks": len(values), "missing": missing,
            "complete": not missing}


def table(suite: dict) -> str:
    lines = [f"{'task':<52} {'metric':<24} value"]
    for row in suite["tasks"]:
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"{row['name']:<52} {row['main_metric'] or '(none)':<24} {value}")
    average = "-" if suite["average"] is None else f"{suite['average']:.4f}"
    lines.append(f"{'DataComp average (' + str(suite['averaged_tasks']) + ' tasks)':<52} {'':<24} {average}")
    for m in suite["missing"]:
        lines.append(f"NOT RUN {m['name']} ({m['task']}): {m['reason']}" +
                     (f", expected {m['expected']}" if m["expected"] else ""))
    return "\n".join(lines)
