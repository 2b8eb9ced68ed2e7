"""A loaded state is frozen out of the cyclic collector's passes, and nothing frozen leaks past the next publish."""

from __future__ import annotations

import gc
import weakref

from ml.serving.state import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_settled_objects_are_frozen_and_old_cycles_freed_at_the_next_settle() -> None:
    try:
        old_state = _Node()
        gone = weakref.ref(old_state)
        settle_heap()  # a state goes live
        assert gc.get_freeze_count() > 0
        del old_state  # the next publish replaced it; its cycle is frozen, so a full pass skips it
        gc.collect()
        assert gone() is not None
        settle_heap()  # the next state goes live: the old cycle is collected now
        assert gone() is None
    finally:
        gc.unfreeze()
