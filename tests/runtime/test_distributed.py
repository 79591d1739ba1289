"""jaxdl.runtime.distributed.initialize: which environments join a multi-process run (variables monkeypatched,
no cluster)."""
import jax
import pytest

from jaxdl.runtime import distributed

# What SLURM sets for a whole allocation (salloc, or an sbatch script) and, besides, for a step run by srun.
ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NODELIST": "node[001-002]",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
SRUN_STEP = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_STEP_NODELIST": "node[001-002]"}
LAUNCHERS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
             *SRUN_STEP, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", distributed.COORDINATOR, distributed.PROCESS_COUNT,
             distributed.PROCESS_ID)


@pytest.fixture
def joins(monkeypatch):
    """The calls `initialize` makes to `jax.distributed.initialize` (recorded, not made), in a clean environment."""
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **options: calls.append((args, options)))
    return calls


def test_a_process_started_inside_a_slurm_allocation_without_srun_runs_alone(monkeypatch, joins):
    for name, value in ALLOCATION.items():  # SLURM_NTASKS=4 describes the allocation, not this single process
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False
    assert joins == []


def test_each_task_of_an_srun_step_of_several_tasks_joins_through_jax_detection(monkeypatch, joins):
    for name, value in {**ALLOCATION, **SRUN_STEP}.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize(initialization_timeout=60) is True
    assert joins == [((), {"initialization_timeout": 60})]  # JAX reads the coordinator, count and id itself


def test_an_srun_step_of_one_task_and_other_launchers(monkeypatch, joins):
    for name, value in {**ALLOCATION, **SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False and joins == []
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun -n 2: a launch of two processes
    assert distributed.initialize() is True and joins == [((), {})]
