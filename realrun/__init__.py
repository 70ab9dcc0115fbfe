"""realrun: the strategies' role programs on real ``torch.distributed``.

Stable public names::

    from realrun import run, Local, EmulatedCluster, Torchrun, RealRunError

``run(experiment)`` executes the same programs the simulator times, with a
torch executor (:mod:`realrun.executor`), and returns a ``RunResult`` in the
simulator's schema plus the trained model's loss.
"""

from realrun.launch import EmulatedCluster, Local, Torchrun
from realrun.run import RealRunError, run

__all__ = ["EmulatedCluster", "Local", "RealRunError", "Torchrun", "run"]
