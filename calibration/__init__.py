"""Timestep-aware calibration sets: samplers (ndtc, uniform, solver), trajectory recording, storage."""
from calibration.config import SAMPLERS, CalibrationConfig
from calibration.record import calibrate
from calibration.storage import (
    CalibrationSet,
    check_calibration_matches,
    load_calibration,
    model_hash,
    model_identity,
    save_calibration,
)

__all__ = [
    "SAMPLERS",
    "CalibrationConfig",
    "CalibrationSet",
    "calibrate",
    "check_calibration_matches",
    "load_calibration",
    "model_hash",
    "model_identity",
    "save_calibration",
]
