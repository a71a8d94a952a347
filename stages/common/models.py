"""open_clip model registry glue: clipforge's shipped tiny configs and configs from any URI.

Imports open_clip (and so torch) lazily: `import stages.common` must stay torch-free.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from stages.common import storage
from stages.common.errors import ConfigError, DataError

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "clipforge-micro"
_registered = False


def register_builtin_configs() -> None:
    """Add clipforge's small CPU-friendly configs (clipforge-micro, clipforge-demo, clipforge-tiny) to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def resolve_model(model: str, model_config_uri: str = "") -> str:
    """The open_clip model name to build; registers a custom JSON config from any URI first.

    `model_config_uri` names a JSON file (open_clip's model config format) in any store; its file
    stem becomes the model name, as with open_clip's `add_model_config`.
    """
    import open_clip

    register_builtin_configs()
    if model_config_uri:
        name = model_config_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
        check_model_name(name, model_config_uri)
        register_config(name, storage.read_json(model_config_uri))
        if model and model != name:  # no --model: the file names the model
            raise ConfigError(f"--model {model!r} differs from the config file's name {name!r} "
                              f"({model_config_uri}); give one or make them agree")
        return name
    model = model or DEFAULT_MODEL
    if model.startswith(("hf-hub:", "local-dir:")):  # open_clip reads the config from the repo/folder
        return model
    if model not in open_clip.list_models():
        raise ConfigError(f"--model {model!r} is not a known open_clip model; see "
                          "open_clip.list_models(), or pass --model-config URI for a custom JSON")
    return model


# open_clip's registry takes a config file whose stem is the name: the name becomes a file name.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_model_name(name: str, source: str = "", error: type[Exception] = ConfigError) -> str:
    """A model name read from a checkpoint or a config URI, safe to use as a file name."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
        where = f"{source}: " if source else ""
        raise error(f"{where}model name {name!r} is not a valid model name (letters, digits, '.', '_', "
                          "'+', '-'; no '/' or '..'); the checkpoint or config was not written by clipforge")
    return name


def register_config(name: str, model_cfg: dict[str, Any], source: str = "") -> None:
    """Register a model config dict under `name` (e.g. one carried inside a checkpoint at `source`)."""
    import open_clip

    check_model_name(name, source, DataError if source else ConfigError)
    register_builtin_configs()
    if "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ConfigError(f"model config {name!r} lacks vision_cfg/text_cfg: not an open_clip config")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(path)


def model_config(name: str) -> dict[str, Any]:
    import open_clip

    register_builtin_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"no open_clip config for model {name!r}")
    return cfg
