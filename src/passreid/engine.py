"""Old home of the training plumbing, kept so that ``passreid.engine.X`` goes on working.

The code now lives in :mod:`passreid.runtime` (devices, DDP, precision, random
streams, threads), :mod:`passreid.training.run` (the run loop, run directory,
stop signal), :mod:`passreid.training.checkpoints` (training checkpoints, resume
checks, exports) and :mod:`passreid.training.schedules`. New code imports from there.
"""

from passreid.runtime import (
    DistInfo,
    agree_across_ranks,
    autocast,
    capture_rng_state,
    cleanup_distributed,
    cores_beside_workers,
    explain_oom,
    gather_rng_states,
    make_grad_scaler,
    resolve_device,
    resolve_precision,
    restore_rank_rng,
    restore_rng_state,
    seed_everything,
    setup_distributed,
    unwrap,
)
from passreid.training.checkpoints import (
    RESUME_IGNORED_KEYS,
    check_resume_config,
    check_resume_fingerprint,
    export_model,
    load_state_checked,
    load_training_checkpoint,
    open_resume_checkpoint,
    resolve_resume_path,
    restore_training_state,
    save_training_checkpoint,
    state_of,
)
from passreid.training.rundir import RunDir
from passreid.training.run import GracefulStop, loss_is_finite
from passreid.training.schedules import cosine_value

__all__ = [
    "RESUME_IGNORED_KEYS", "DistInfo", "GracefulStop", "RunDir", "agree_across_ranks", "autocast",
    "capture_rng_state", "check_resume_config", "check_resume_fingerprint", "cleanup_distributed",
    "cores_beside_workers", "cosine_value", "explain_oom", "export_model", "gather_rng_states", "load_state_checked",
    "load_training_checkpoint", "loss_is_finite", "make_grad_scaler", "open_resume_checkpoint", "resolve_device",
    "resolve_precision", "resolve_resume_path", "restore_rank_rng", "restore_rng_state", "restore_training_state",
    "save_training_checkpoint", "seed_everything", "setup_distributed", "state_of", "unwrap",
]
