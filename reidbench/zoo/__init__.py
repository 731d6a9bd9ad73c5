"""The model zoo: ``model_zoo.yaml`` entries (:mod:`.schema`), where their weights come from
(:mod:`.weights`), and obtaining them, by training when need be (:mod:`.training`).

Callers import from here; a test that replaces a function must patch the module that looks
it up (``reidbench.zoo.training.train_entry``, not ``reidbench.zoo.train_entry``).
"""

from .schema import DEFAULT_ZOO, ZooEntry, default_zoo_path, get_entry, load_zoo, training_entry
from .training import obtain_weights, train_entry
from .weights import (HubUnreachable, download_hub_weights, existing_weights, intact_trained_weights, load_weights,
                      local_weights_path, read_state_dict, trained_weights_dir, trained_weights_file)

__all__ = ["DEFAULT_ZOO", "HubUnreachable", "ZooEntry", "default_zoo_path", "download_hub_weights", "existing_weights",
           "get_entry", "intact_trained_weights", "load_weights", "load_zoo", "local_weights_path", "obtain_weights",
           "read_state_dict", "train_entry", "trained_weights_dir", "trained_weights_file", "training_entry"]
