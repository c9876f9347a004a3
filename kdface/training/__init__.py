"""The trainer behind ``python -m kdface.train``: config, step, loop, checkpoints, logs."""
from kdface.training._arrays import ArrayBatches
from kdface.training._checkpoint import Checkpoints, load_model_weights
from kdface.training._config import TrainConfig, option_fields
from kdface.training._logging import RunLog, read_events
from kdface.data import normalize_images  # re-exported: the trainer's input convention
from kdface.training._loop import NonFiniteLossError, VerificationSet, data_mesh, fit, shard_batch
from kdface.training._optim import (StepSchedule, epochs_to_steps, learning_rate_schedule,
                                    make_optimizer)
from kdface.training._plan import DataFacts, FitPlan, RunPlan, make_plan, resolve_schedule
from kdface.training._restore import Restored, read_run_config, resolve_run_dir, restore_run
from kdface.training._step import (StepConfig, init_health, init_state, make_train_step,
                                   split_teacher)
from kdface.training._run import resolve_training_data, run

__all__ = ["ArrayBatches", "Checkpoints", "DataFacts", "data_mesh", "FitPlan", "make_plan",
           "RunPlan", "epochs_to_steps", "fit", "init_health",
           "init_state", "learning_rate_schedule", "load_model_weights", "make_optimizer",
           "make_train_step", "NonFiniteLossError", "normalize_images", "option_fields",
           "read_events", "read_run_config", "resolve_run_dir", "resolve_schedule",
           "resolve_training_data", "restore_run", "Restored", "run", "RunLog", "shard_batch",
           "split_teacher", "StepConfig", "StepSchedule", "TrainConfig", "VerificationSet"]
