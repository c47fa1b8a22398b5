"""Stage configs: the schema (every key and default), strict loading, and commented YAML.

`pipeline.config.schema` holds the dataclasses, `loading` builds them from YAML and `--set`,
`checks` looks at model folders and lengths, `docs` writes a config back as commented YAML.
"""

from pipeline.config.checks import (
    check_fits,
    check_gold,
    check_model_path,
    check_reward_model_path,
    local_model_config,
    looks_local,
)
from pipeline.config.loading import config_from_dict, digest, load_config, to_dict, write_resolved
from pipeline.config.schema import *  # noqa: F403 - the schema's dataclasses and defaults (its __all__)
from pipeline.config.schema import __all__ as _schema_names
from pipeline.errors import ConfigError

# name -> config class, for every stage (the stage table in pipeline/stages.py is the source).
STAGES: dict[str, type] = {}


def _stage_configs() -> None:
    from pipeline.stages import STAGES as registry

    STAGES.update({name: stage.config for name, stage in registry.items()})


_stage_configs()

__all__ = [
    *_schema_names,
    "STAGES",
    "ConfigError",
    "check_fits",
    "check_gold",
    "check_model_path",
    "check_reward_model_path",
    "config_from_dict",
    "digest",
    "load_config",
    "local_model_config",
    "looks_local",
    "to_dict",
    "write_resolved",
]
