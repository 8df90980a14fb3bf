"""Per-process cache of `core.pipeline.Predictor` objects for the scoring endpoint."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class PredictorCache:
    """Least-recently-used cache of predictors, keyed by job id and artifact digest.

    Building a predictor loads the checkpoint and the artifact, which takes far longer than scoring
    a few images, so the API keeps the most recent `size` of them.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], build: Callable[[], Any]) -> Any:
        """Return the cached predictor for `key`, building it with `build` on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # Built outside the lock so that one slow load does not block scoring of other jobs.
        predictor = build()
        logger.info("loaded predictor for job %s", key[0])
        if self.size == 0:
            return predictor
        with self._lock:
            self._items[key] = predictor
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return predictor

    def __len__(self) -> int:
        return len(self._items)
