"""The config checks registry: each package registers the checks of the keys it owns.

Two kinds of entries, both one line per problem naming the key and the fix:

* choices (:func:`register_choices`): a key with a fixed set of values, the set taken from the
  owner's own registry (``data.source`` from the data factory, ``loss.name`` from the loss kinds).
  They need no devices, so :func:`check_choices` runs them before anything is built.
* checks (:func:`register`): ``check(config, context) -> list[str]``, values against each other
  and, through :class:`Context`, against the mesh and the process count.

:func:`validate` runs them all and raises one ValueError listing every problem. The config package
is the bottom layer: it imports no other part of align_jax, and the packages import this module to
register. A check module that is never imported would be silently skipped, so callers do not use
this module directly: :mod:`align_jax.train.validation` imports every check module and is what
the commands and the trainer call (tests/test_config.py checks that it names every module that
registers).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import ml_collections


@dataclasses.dataclass(frozen=True)
class Context:
  """What checks may compare the config with besides itself.

  ``num_batch_devices``: how many ways the mesh splits the batch
  (``align_jax.parallel.mesh.num_batch_shards``: the batch axes' sizes, ICI x DCN on a
  multi-slice mesh); ``num_processes``: the JAX processes of the run.
  """
  num_batch_devices: int = 1
  num_processes: int = 1


Check = Callable[[ml_collections.ConfigDict, Context], list]


@dataclasses.dataclass(frozen=True)
class _Choices:
  key: str  # dotted, e.g. "data.source"
  choices: Callable[[], Sequence[str]]
  what: str  # how the error names the key, e.g. "data source"
  module: str


# keyed by where each entry is defined, so a module imported twice (importlib.reload) registers once
_CHOICES: dict[tuple[str, str], _Choices] = {}
_CHECKS: dict[str, Check] = {}


def register_choices(module: str, key: str,
                     choices: Sequence[str] | Callable[[], Sequence[str]], *, what: str = "") -> None:
  """Registers the allowed values of the dotted ``key``: a sequence, or a function returning it
  (read when checking, so a registry that grows later is seen). ``what`` names the key in the
  error (default: the key); ``module`` is the registering module's ``__name__``.

      checks.register_choices(__name__, "loss.name", kinds.NAMES, what="loss")
  """
  values = choices if callable(choices) else (lambda: tuple(choices))
  _CHOICES[(module, key)] = _Choices(key, values, what or key, module)


def register(check: Check) -> Check:
  """Registers ``check(config, context) -> list[str]`` (usable as a decorator)."""
  _CHECKS[f"{check.__module__}.{check.__qualname__}"] = check
  return check


def registered_modules() -> set[str]:
  """The modules that registered choices or checks so far."""
  return ({entry.module for entry in _CHOICES.values()}
          | {check.__module__ for check in _CHECKS.values()})


def _value(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def choice_problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line for each registered key whose value is not one of its choices."""
  problems = []
  for entry in _CHOICES.values():
    value, choices = _value(config, entry.key), tuple(entry.choices())
    if value not in choices:
      problems.append(f"unknown {entry.what} {value!r}: set --config.{entry.key} to one of "
                      f"{', '.join(repr(c) for c in choices)}")
  return problems


def check_choices(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) if a key with a fixed set of values has another one.

  Needs no devices, so the command line runs it for every mode before anything is built.
  """
  problems = choice_problems(config)
  if problems:
    raise ValueError("; ".join(problems))


def validate(config: ml_collections.ConfigDict, num_batch_devices: int = 1,
             num_processes: int = 1) -> None:
  """Runs every registered choice and check; raises one ValueError listing all the problems."""
  context = Context(num_batch_devices=num_batch_devices, num_processes=num_processes)
  problems = choice_problems(config)
  for check in _CHECKS.values():
    problems += check(config, context)
  if problems:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))
