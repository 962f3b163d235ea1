"""Steering: vectors as values, the active mix, and training from contrastive pairs."""
from max_jupyter.steering.controller import MixEntry, MixState, SteeringController
from max_jupyter.steering.training import read_last_token_states, train_vector
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector

__all__ = ["MixEntry", "MixState", "ModelMismatchError", "SteeringController", "SteeringVector",
           "read_last_token_states", "train_vector"]
