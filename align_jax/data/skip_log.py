"""Capped logging of skipped records: the first few per source and reason, then only counts.

A source with many bad records must not bury the run's log (a 20-step run once printed 459 skip
lines). Every skip is still counted by its source (``data/skipped_<reason>`` in ``metrics.jsonl``);
here, per process and per (source, reason), the first :data:`LOG_FIRST` are logged with their file
or key, and after that one line each time the count reaches 10, 100, 1000, ... Evaluation
passes, which re-read the same bad records every time, add one summary line per pass
(:func:`summary`).
"""

from __future__ import annotations

import logging
import threading

LOG_FIRST = 3
_counts: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def record(logger: logging.Logger, source: str, reason: str, detail: str) -> None:
  """Counts one skipped record of ``source`` and logs it if it is among the first few."""
  with _lock:
    count = _counts[(source, reason)] = _counts.get((source, reason), 0) + 1
  if count < LOG_FIRST:
    logger.warning("data: skipped_%s (#%d) %s", reason, count, detail)
  elif count == LOG_FIRST:
    logger.warning("data: skipped_%s (#%d) %s; further %s skips in %s are counted "
                   "(data/skipped_%s), not logged one by one", reason, count, detail, reason,
                   source, reason)
  elif _is_power_of_ten(count):
    logger.warning("data: skipped_%s: %d records of %s so far", reason, count, source)
  else:
    logger.debug("data: skipped_%s (#%d) %s", reason, count, detail)


def summary(logger: logging.Logger, what: str, counts: dict[str, int]) -> None:
  """One line with a pass's skip counts (nothing if there were none)."""
  if counts and sum(counts.values()):
    logger.warning("%s: %d records skipped (%s)", what, sum(counts.values()),
                   ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def _is_power_of_ten(n: int) -> bool:
  while n >= 10 and n % 10 == 0:
    n //= 10
  return n == 1


def reset() -> None:
  """Forgets the counts (tests)."""
  with _lock:
    _counts.clear()
