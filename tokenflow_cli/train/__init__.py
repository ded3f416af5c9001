"""Training: the generic loop (`loop.train` + `loop.Stage`), its progress display and logs, and the
tokenizer stage. Later stages (generator, LLaVA) subclass `Stage` and call `train`."""

from tokenflow_cli.train.loop import NonFiniteLossError, OptimizerSpec, Stage, TrainData, TrainResult, train

__all__ = ["NonFiniteLossError", "OptimizerSpec", "Stage", "TrainData", "TrainResult", "train"]
