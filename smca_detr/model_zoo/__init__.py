"""Model zoo: shipped configs by name, models from them with official or our weights, a predictor.
See ``docs/MODEL_ZOO.md`` for the official checkpoints each config loads."""
from .model_zoo import (Predictor, build_model_from_config, dataset_metadata, dataset_thing_classes, get_config,
                        get_config_file, inference_config, is_imagenet_backbone, list_configs, load_weights)

__all__ = ["list_configs", "get_config_file", "get_config", "inference_config", "build_model_from_config",
           "dataset_metadata", "dataset_thing_classes", "is_imagenet_backbone", "load_weights", "Predictor"]
