"""DataLoader worker count and prefetch depth from the CPU cores a rank may use.

Lives in the data layer (the data module needs it, and the data layer must not import the training layer);
``qwen3asr_train.training`` re-exports these names.
"""

from __future__ import annotations

import os


def node_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which honours cgroup/SLURM CPU binding), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | str, local_ranks: int = 1, cores: int | None = None) -> int:
    """DataLoader worker processes per rank: an int as given; ``auto`` = ``min(8, cores per local rank - 1)``
    (at least 0).

    Why from the cores: each worker decodes audio, computes log-mel features and tokenises at 1.2-1.9k
    audio-seconds per CPU-second, and a 0.6B model at 40% MFU on an H100 consumes ≈4.8k audio-s/s, so a
    GPU needs about 3-4 busy workers. A fixed count either starves an 8-GPU node (2 workers per GPU) or
    oversubscribes a laptop. One core per rank stays for the training process itself; 8 is where more
    workers stop paying (and each holds a copy of the dataset index).
    """
    if isinstance(setting, int) or (isinstance(setting, str) and setting.strip().lstrip("-").isdigit()):
        value = int(setting)
        if value < 0:
            raise ValueError(f"data.num_workers={setting!r}: must be >= 0 or auto")
        return value
    if setting != "auto":
        raise ValueError(f"data.num_workers={setting!r}: must be an integer >= 0 or auto")
    cores = node_cores() if cores is None else cores
    return max(0, min(8, cores // max(local_ranks, 1) - 1))


def resolve_prefetch_factor(setting: int | str, workers: int) -> int | None:
    """``prefetch_factor`` of the DataLoader: None without workers (torch refuses one); an int as given;
    ``auto`` = ``max(2, ceil(8 / workers))``, so about 8 windows are prepared ahead whatever the worker count
    (a window of 120-s micro-batches is a few MB of features: memory is not the limit, latency spikes are)."""
    if workers == 0:
        return None
    if setting == "auto":
        return max(2, -(-8 // workers))
    value = int(setting)
    if value < 1:
        raise ValueError(f"data.prefetch_factor={setting!r}: must be >= 1 or auto")
    return value
