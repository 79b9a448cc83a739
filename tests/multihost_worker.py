"""One process of the multi-host train-step test (run by train_multihost_test.py).

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON FSDP
"""

import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(process_id: int, num_processes: int, port: int, out: str, fsdp: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import micro_config
    import numpy as np

    from region_medclip import sharding as sharding_lib

    c = micro_config.get_config()
    c.mesh.fsdp = fsdp
    mesh = sharding_lib.make_mesh(c.mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    # This process's rows of each global batch: those of its addressable devices' shards.
    local = sorted(
        {
            idx[0].start or 0
            for idx in batch_sharding.addressable_devices_indices_map((c.data.batch_size,)).values()
        }
    )
    per_device = c.data.batch_size // mesh.devices.size
    rows = np.concatenate([np.arange(s, s + per_device) for s in local])
    batches = [
        {k: v[rows] for k, v in micro_config.random_batch(c, seed).items()} for seed in range(3)
    ]
    _, history = micro_config.run_steps(c, batches)
    losses = [h["loss"] for h in history]
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
