"""A user's own reward function, named "python:package.module:function", run inside a verifier worker.

The contract (docs/data.md states it for users):
- the function is called as `function(response, ground_truth)` with two
  strings: the model's completion text and the dataset's answer;
- it returns a bool (True = 1, False = 0), a number in [0, 1] (partial
  credit in between), or a pair `(reward, reason)` whose reason is a string
  or None; the reason is shown in the verdict (`<name>: <reason>`);
- anything else (an import error, a missing function, an exception, a value
  outside [0, 1] or of another type, a check that overruns the time limit)
  scores 0 with a reason that starts with "error" or "timeout" and names the
  function; the worker pool and the reward service carry on.

Where modules may come from: only the directories of the reward service's
`python_path` (`reward.python_path` in the config, `--python-path` of
`python -m services.reward`). A module found anywhere else, the standard
library or site-packages included, is refused before it is imported, so a
request naming `python:shutil:rmtree` cannot make the service call it; and
the function must be defined in the named module itself, not imported into it.

The function runs in the worker process under the pool's time limit and
memory cap (e3.verify.pool). Each worker imports the module on its first
check of that name, and that import counts against that check's limit; a
worker killed at the limit is replaced by a fresh one, which imports again.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from e3.verify.verdict import ERROR_PREFIX

PREFIX = "python:"
MAX_REASON_CHARS = 300


class RewardFunctionError(Exception):
    """The named function cannot be used; the message says why (the name is added by the caller)."""


def add_to_path(python_path: Sequence[str]) -> None:
    """Put the reward directories first on this process's import path (called once per worker)."""
    for directory in reversed(python_path):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def _inside(location: str, roots: list[Path]) -> bool:
    resolved = Path(location).resolve()
    return any(resolved == root or root in resolved.parents for root in roots)


def _check_location(top: str, python_path: Sequence[str]) -> None:
    """Refuse, before importing it, a top-level package that does not live in `python_path`."""
    if not python_path:
        raise RewardFunctionError("python: reward functions are off: the reward service has no python_path "
                                  "(set reward.python_path, or --python-path DIR)")
    roots = [Path(p).resolve() for p in python_path]
    loaded = sys.modules.get(top)
    if loaded is not None:  # e.g. "json" or "e3", imported by the worker itself
        locations = list(getattr(loaded, "__path__", None) or [getattr(loaded, "__file__", None) or "<built-in>"])
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError) as exc:
            raise RewardFunctionError(f"cannot look up module {top!r}: {exc}") from exc
        if spec is None:
            raise RewardFunctionError(f"no module named {top!r} (python_path: {list(python_path)})")
        locations = list(spec.submodule_search_locations or [spec.origin or "<built-in>"])
    outside = [loc for loc in locations if loc.startswith("<") or not _inside(loc, roots)]
    if outside:
        raise RewardFunctionError(
            f"module {top!r} is at {outside[0]}, outside python_path {list(python_path)}; "
            "only modules there may be reward functions"
        )


def resolve(name: str, python_path: Sequence[str]) -> Callable[[str, str], Any]:
    """The function `name` ("python:package.module:function") names, imported from `python_path`."""
    module_name, _, function_name = name[len(PREFIX):].rpartition(":")
    _check_location(module_name.split(".")[0], python_path)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken user module: its own error, reported
        raise RewardFunctionError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise RewardFunctionError(f"module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise RewardFunctionError(f"{module_name}.{function_name} is a {type(function).__name__}, not a function")
    # A name the module merely imported (say `from shutil import rmtree`) is not a reward function.
    defined_in = getattr(function, "__module__", None)
    if defined_in != module_name:
        raise RewardFunctionError(f"{module_name}.{function_name} is defined in {defined_in!r}, not in {module_name!r}; "
                                  "only functions defined in the module itself may be reward functions")
    return function


def _reward(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, numbers.Real):
        reward = float(value)
        if math.isfinite(reward) and 0.0 <= reward <= 1.0:
            return reward
        raise RewardFunctionError(f"returned {value!r}, outside [0, 1]")
    raise RewardFunctionError(
        f"returned a {type(value).__name__}; expected a bool, a number in [0, 1] or (reward, reason)"
    )


def interpret(name: str, result: Any) -> tuple[float, str | None]:
    """(reward, reason) from what the function returned; RewardFunctionError if it breaks the contract."""
    reason = None
    if isinstance(result, tuple):
        if len(result) != 2:
            raise RewardFunctionError(f"returned a tuple of {len(result)} items; expected (reward, reason)")
        result, reason = result
        if reason is not None and not isinstance(reason, str):
            raise RewardFunctionError(f"returned a reason of type {type(reason).__name__}; expected a string or None")
    reward = _reward(result)
    if reason:
        # Prefixed with the name so a user's reason never reads as a timeout or error of the pool.
        return reward, f"{name}: {reason}"[:MAX_REASON_CHARS]
    return reward, (f"{name}: scored 0" if reward == 0.0 else None)


class PythonRewards:
    """One worker's resolved functions, so each module is imported once per worker."""

    def __init__(self, python_path: Sequence[str]) -> None:
        self.python_path = list(python_path)
        self._functions: dict[str, Callable[[str, str], Any]] = {}

    def score(self, name: str, response: str, ground_truth: str) -> tuple[float, str | None]:
        """(reward, reason) of `response`; every failure is (0.0, "error: <name>: ...")."""
        try:
            function = self._functions.get(name)
            if function is None:
                function = self._functions[name] = resolve(name, self.python_path)
            try:
                result = function(response, ground_truth)
            except (Exception, SystemExit) as exc:  # SystemExit: a sys.exit() in user code must not end the worker
                raise RewardFunctionError(f"raised {type(exc).__name__}: {exc}") from exc
            return interpret(name, result)
        except RewardFunctionError as exc:
            return 0.0, f"{ERROR_PREFIX}: {name}: {exc}"[:MAX_REASON_CHARS]
