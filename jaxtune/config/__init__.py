"""Typed run configuration: frozen dataclasses (sections.py) with declared ranges (ranges.py), loaded from YAML
plus dotted `key=value` overrides (loading.py)."""

from jaxtune.config.loading import (
  PACKAGED,
  apply_override,
  from_dict,
  load,
  resolve_path,
  shipped,
  to_dict,
)
from jaxtune.config.ranges import Range, declared
from jaxtune.config.sections import (
                                     CheckpointConfig,
                                     Config,
                                     DataConfig,
                                     GenerateConfig,
                                     LoraConfig,
                                     MeshConfig,
                                     ModelConfig,
                                     OptimConfig,
                                     PreferenceConfig,
                                     QAConfig,
                                     TrainConfig,
)

__all__ = ["PACKAGED", "CheckpointConfig", "Config", "DataConfig", "GenerateConfig", "LoraConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "PreferenceConfig", "QAConfig", "Range", "TrainConfig", "apply_override",
           "declared", "from_dict", "load", "resolve_path", "shipped", "to_dict"]
