"""Generic training machinery: the one loop (`loop.train`) and the `Stage` protocol each
capability implements (`tokenizer/stage.py`, `generation/stage.py`, ...), run state and resume,
resumable data streams, optimizers, progress, DDP/FSDP. Imports no capability."""
