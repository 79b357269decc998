"""The private local Ray is started again when Ray gives up waiting for its raylet (a loaded machine)."""

import pytest

from audit.errors import AuditError
from audit.runner.cluster import LOCAL_START_ATTEMPTS, _start_local


class FakeRay:
    """ray.init raises Ray's startup timeout ``fails`` times, then succeeds."""

    def __init__(self, fails, error="The current node timed out during startup. This could happen because ..."):
        self.fails, self.error = fails, error
        self.inits, self.shutdowns = 0, 0

    def init(self, **kwargs):
        self.inits += 1
        assert kwargs["address"] == "local"
        if self.inits <= self.fails:
            raise Exception(self.error)

    def shutdown(self):
        self.shutdowns += 1


def test_a_timed_out_start_is_tried_again():
    ray, said = FakeRay(fails=2), []
    _start_local(ray, {}, said.append)
    assert ray.inits == 3 and ray.shutdowns == 2
    assert len(said) == 2 and "attempt 1 of 3" in said[0] and "starting it again" in said[0]


def test_every_start_timing_out_is_one_line():
    ray = FakeRay(fails=99)
    with pytest.raises(AuditError, match="did not start.*3 times") as e:
        _start_local(ray, {}, lambda m: None)
    assert ray.inits == LOCAL_START_ATTEMPTS and "\n" not in str(e.value)


def test_other_errors_are_not_retried():
    ray = FakeRay(fails=1, error="some other failure")
    with pytest.raises(Exception, match="some other failure"):
        _start_local(ray, {}, lambda m: None)
    assert ray.inits == 1
