"""The pipeline's errors, each named for what the user must fix.

They live in this light module so that the CLI can tell them apart (exit 2: unusable
input; exit 1: the gate failed) without importing the ML stack first.
"""


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message names the field."""


class DataError(ValueError):
    """The dataset cannot be used as given; the message says why."""


class ModelLoadError(RuntimeError):
    """A base model or tokenizer that cannot be loaded; the message names it."""


class GateFailed(RuntimeError):
    """The data-quality gate rejected the dataset; nothing downstream may run."""


class TrainingFailed(RuntimeError):
    """The training process failed (crash, OOM, killed); its last output is in the message."""


class TrainingDiverged(TrainingFailed):
    """The training loss became NaN or infinite: the adapter would be garbage, so nothing is saved or registered."""


class RegistryConflict(RuntimeError):
    """The registry is not in the state a decision was made for (an alias moved, an adapter changed)."""


class RegistryUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached, does not answer, or refuses this user's writes."""


class ExportFailed(RuntimeError):
    """A merged model failed its equivalence check against the adapter model (ml/equivalence.py), or
    could not be built: nothing of it was recorded."""
