"""The tests' only private Flower API (``TaskIdentity``, in tests/flower_messages.py) fails loudly,
not silently, on a Flower release it was not checked against."""

import flwr
from flwr.supercore.task_identity import TaskIdentity

from tests.flower_messages import VERIFIED_FLOWER, task_identity


def test_the_installed_flower_is_the_one_the_private_api_was_checked_on():
    assert flwr.__version__ == VERIFIED_FLOWER, (
        f"flwr {flwr.__version__} is installed; tests/flower_messages.py sets Flower's private TaskIdentity as "
        f"flwr {VERIFIED_FLOWER} lays it out: re-check it (and tests/simulation.py), then update VERIFIED_FLOWER"
    )


def test_task_identity_is_set_inside_the_block_and_restored_after():
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with task_identity(run_id=7, node_id=8, task_id=9):
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (7, 8, 9)
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before
