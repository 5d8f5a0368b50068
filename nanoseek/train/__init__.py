"""Pre-training: the pieces `nanoseek train` (nanoseek/stages/train.py) puts together.

    schedule.py  V3's learning-rate shape, batch-size ramp, MTP weight λ and bias speed γ, scaled
    balance.py   aux-loss-free bias update, sequence-wise and classic balance losses, MaxVio
    loss.py      next-token + MTP + balance loss, validation loss
    state.py     checkpoints: HF model dir + trainer_state/ (safetensors + JSON), atomic, exact resume
    metrics.py   model FLOPs per token, measured peak FLOP/s, the JSONL log
    report.py    PNG plots and report.md
    sample.py    a plain sampling loop for a look at the model during and after training
"""
