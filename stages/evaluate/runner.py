"""The evaluate stage: check every input, load the model, evaluate each set, report."""

from __future__ import annotations

import time

from stages.common import config as config_mod
from stages.common import distributed, runinfo
from stages.common.logs import setup_logging
from stages.common.shards import SampleKeys, probe
from stages.evaluate import features, report, suite, winogavil
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.evalsets import (
    CLASSIFICATION,
    LINEAR_PROBE,
    RETRIEVAL,
    EvalSet,
    open_eval_set,
    open_val_split,
)
from stages.evaluate.evaluation import evaluate_set
from stages.evaluate.model import load_model


def open_inputs(cfg: EvaluateConfig) -> list[EvalSet | winogavil.WinoSet]:
    """Every eval set, checked (class names, templates, shards, the first samples) before any
    model is built: wds sets (EvalSet) and, in the suite, WinoGAViL's Hugging Face set (WinoSet)."""
    if cfg.model:
        from stages.evaluate import stock

        stock.check(cfg.model, cfg.pretrained)
    sets = [open_eval_set(name, uri) for name, uri in cfg.eval_specs()]
    sets += [open_eval_set(name, uri, linear_probe=True) for name, uri in cfg.linear_probe_specs()]
    hf_sets = []
    if cfg.suite:
        for task, uri in suite.locate(cfg.suite_root)[0]:
            if task.hf_cache:
                hf_sets.append(winogavil.open_set(task.key, uri))
                hf_sets[-1].max_samples = cfg.max_samples
            else:
                sets.append(open_eval_set(task.key, uri))
    if cfg.val_data:
        sets.append(open_val_split(cfg.val_data))
    keys = SampleKeys(max_pixels=cfg.max_image_pixels)
    for es in sets:
        es.keys, es.max_samples = keys, cfg.max_samples
        need = ("caption" if es.task == RETRIEVAL else "label" if es.task in (CLASSIFICATION, LINEAR_PROBE)
                and es.groups not in ("fairface", "utkface") else "image")
        probe(es.shards, keys, f"eval set {es.name} ({es.uri})", need=need)
    return sets + hf_sets


def _evaluate(evalset, loaded, device, cfg: EvaluateConfig, ctx, log) -> dict:
    if isinstance(evalset, winogavil.WinoSet):
        amp = features.autocast_for(device, cfg.precision)
        return winogavil.evaluate(evalset, loaded, device, amp, ctx, log)
    return evaluate_set(evalset, loaded, device, cfg, ctx, log)


def _load(cfg: EvaluateConfig, device):
    if cfg.model:
        from stages.evaluate import stock

        return stock.load(cfg.model, cfg.pretrained, device)
    return load_model(cfg.checkpoint_uri, device)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    started = time.time()
    ctx = distributed.init_distributed(cfg.device)
    device = ctx.device
    log = setup_logging("evaluate", cfg.run_id, ctx.rank, cfg.log_level)
    metrics = report.EvalMetrics(cfg.run_id)
    if ctx.is_main:
        metrics.stage.serve(cfg.metrics_port, cfg.metrics_addr)
    try:
        evalsets = open_inputs(cfg)
        loaded = _load(cfg, device)
        log.info("model %s from %s (step %s) on %s, %d rank(s)", loaded.name, loaded.checkpoint,
                 loaded.step, device, ctx.world_size)
        results = {es.name: _evaluate(es, loaded, device, cfg, ctx, log) for es in evalsets}
        model_info = {"name": loaded.name, "checkpoint": loaded.checkpoint, "step": loaded.step}
        document = report.results_document(results, model_info)
        if cfg.suite:
            document["suite"] = suite.summary(results, suite.locate(cfg.suite_root)[1])
        if ctx.is_main:
            _publish(cfg, document, metrics, started)
        distributed.barrier(ctx)
        return document
    finally:
        metrics.stage.stop()
        distributed.shutdown()


def _publish(cfg: EvaluateConfig, document: dict, metrics: report.EvalMetrics, started: float) -> None:
    report.write_results(cfg.results_uri, document)
    print(report.table(document), flush=True)
    if "suite" in document:
        print(suite.table(document["suite"]), flush=True)
    print(f"results: {cfg.results_uri}", flush=True)
    runinfo.record_stage(
        cfg.run_dir, "evaluate", config=config_mod.to_dict(cfg),
        inputs={"checkpoint": document["model"]["checkpoint"],
                "eval_data": {n: d["uri"] for n, d in document["datasets"].items()}},
        outputs={"results": cfg.results_uri}, started=started,
        packages=("torch", "open_clip_torch", "webdataset"))
    metrics.record(document)
    metrics.stage.mark_success()
    metrics.stage.push(cfg.pushgateway)
