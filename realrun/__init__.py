"""realrun: the strategies' role programs on real ``torch.distributed``.

Stable public names::

    from realrun import run, Local, EmulatedCluster, Torchrun, RealRunError
    from realrun import calibrate, Calibration, validate

``run(experiment)`` executes the same programs the simulator times, with a
torch executor (:mod:`realrun.executor`), and returns a ``RunResult`` in the
simulator's schema plus the trained model's loss. ``calibrate`` measures this
machine and its links for the simulator (:mod:`realrun.calibrate`); ``validate``
runs experiments in both executors and tabulates the error (:mod:`realrun.validate`).
"""

from realrun.calibrate import Calibration, calibrate
from realrun.launch import EmulatedCluster, Local, Torchrun
from realrun.run import RealRunError, run
from realrun.validate import validate

__all__ = ["Calibration", "EmulatedCluster", "Local", "RealRunError", "Torchrun", "calibrate", "run", "validate"]
