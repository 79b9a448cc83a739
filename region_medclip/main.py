"""Trains a config: ``python -m region_medclip.main --config=FILE[:args] --workdir=DIR``.

Any config field can be overridden (``--config.loss.global_kind=sigmoid``). A workdir that holds
checkpoints resumes from the latest one. With ``--multiprocess`` the process joins a JAX
multi-controller job (``jax.distributed.initialize``): on TPU VMs and under SLURM the coordinator
is found automatically; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (see ``launch/``).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MULTIPROCESS = flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_distributed() -> None:
    """Joins the multi-controller job; on CPU, collectives across processes go through gloo."""
    import jax

    kwargs = {
        key: value
        for key, value in dict(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        ).items()
        if value is not None
    }
    if (_NUM_PROCESSES.value or 1) > 1 and jax.config.jax_platforms in ("cpu", "", None):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def main(argv):
    del argv
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    # Orbax and grain report every save at INFO through absl; keep the progress lines readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from region_medclip import config as config_lib

    config = _CONFIG.value
    config_lib.validate(config)  # before any device work: a bad key fails in a second
    if _MULTIPROCESS.value:
        initialize_distributed()
    from region_medclip import train

    result = train.train_and_evaluate(config, _WORKDIR.value)
    logging.info(
        "finished at step %d%s",
        result["step"],
        " (preempted; rerun to resume)" if result["preempted"] else "",
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
