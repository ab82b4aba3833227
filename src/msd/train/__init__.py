"""MSD training.

    from msd.train import train
    result = train(load_config("configs/x.yaml"))

Modules: `loop` (the algorithm: resume -> responses -> step -> log -> save), `items` (training
items and micro-batches), `responses` (on-policy samples | off-policy teacher cache), `setup`
(accelerator, student, frozen teacher, optimizer), `schedule` (the learning-rate schedule,
shared with `msd baseline`), `checkpoint` (atomic checkpoints, resume
check, the final model), `sharding` (msd's FSDP2, cross-process agreement), `dist_checkpoint`
(checkpoints through the engine), `logs` (statistics, logs.jsonl, trackers, token batches).
"""

from msd.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
