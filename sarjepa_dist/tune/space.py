"""A sweep's search space: axes over any config key, mapped onto Ray Tune's sampling API, and every
point checked against the config validators before a trial starts.

An axis is a dotted config key (a pair's element as ``key[0]`` / ``key[1]``, e.g. ``optim.ema[0]``
for the EMA τ start) and one sampler with its arguments (``config.SEARCH_SAMPLERS``). A sampled
axis is checked at its bounds, a grid or choice axis at each value; then, while there are at most
``MAX_CHECKED_COMBINATIONS`` of them, every combination of those values across the axes (a low
bound above a high one shows only there).
"""

from __future__ import annotations

import copy
import itertools
import random
import re
from dataclasses import dataclass
from typing import Any

from sarjepa_dist.config import Config, ConfigError, TuneConfig, config_from_dict, set_dotted

MAX_CHECKED_COMBINATIONS = 4096
# Sections and keys a trial may not vary: where it runs and where it writes are the sweep's.
FIXED_KEYS = ("ray.", "storage.", "tune.", "pipeline.", "train.name", "train.storage_path")
# The one key of a shuffled grid's param_space: Tune walks its list of whole points in that order.
GRID_POINT = "grid_point"
_INDEXED = re.compile(r"^(?P<key>[A-Za-z_][\w.]*?)(?:\[(?P<index>\d+)\])?$")


@dataclass(frozen=True)
class Axis:
    key: str  # dotted config key, optionally with [index]
    sampler: str  # config.SEARCH_SAMPLERS
    args: tuple[Any, ...]
    where: str  # the config key that declared it, for messages: tune.search.<key> or tune.grid.<key>

    def check_values(self) -> list[Any]:
        """The values a point can take at its edges: each choice, or the bounds of a range."""
        if self.sampler in ("grid", "choice"):
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.sampler in ("randint", "lograndint"):
            high -= 1  # Ray's upper bound is exclusive
        return [low, high]


def sweep_axes(tc: TuneConfig) -> list[Axis]:
    """The axes of ``tune.search`` and the older ``tune.grid``, sorted by key."""
    axes = [Axis(k, "grid", tuple(v), f"tune.grid.{k}") for k, v in tc.grid.items()]
    for key, spec in tc.search.items():
        (sampler, args), = ({"grid": spec} if isinstance(spec, list) else spec).items()
        axes.append(Axis(key, sampler, tuple(args), f"tune.search.{key}"))
    return sorted(axes, key=lambda a: a.key)


def apply_point(tree: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config ``tree`` with the point's values set (``key[i]`` sets one element)."""
    tree = copy.deepcopy(tree)
    for dotted, value in point.items():
        m = _INDEXED.match(dotted)
        if m is None:
            raise ConfigError(f"tune search key {dotted!r} is not a dotted config key (e.g. optim.lr, optim.ema[0])")
        key, index = m.group("key"), m.group("index")
        if index is not None:
            node: Any = tree
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, list) or int(index) >= len(node):
                raise ConfigError(f"tune search key {dotted!r}: {key} is not a list with an element {index}")
            items = list(node)
            items[int(index)] = value
            value = items
        set_dotted(tree, key, value)
    return tree


def check_space(axes: list[Axis], base: Config) -> None:
    """Refuse, naming the key, any value a trial could get that the config validators reject."""
    base_tree = base.to_dict()
    if not axes:
        raise ConfigError("the sweep has no axes: give tune.search (or tune.grid), e.g. "
                          "tune.search: {optim.lr: {loguniform: [1e-4, 3e-3]}}")
    for axis in axes:
        if axis.key.startswith(FIXED_KEYS) or axis.key in FIXED_KEYS:
            raise ConfigError(f"{axis.where}: a sweep cannot vary {axis.key} (fixed per sweep: "
                              f"{', '.join(FIXED_KEYS)})")
        for value in axis.check_values():
            try:
                config_from_dict(apply_point(base_tree, {axis.key: value}))
            except ConfigError as exc:
                raise ConfigError(f"{axis.where}: the value {value!r} is invalid: {exc}") from exc
    combos = 1
    for axis in axes:
        combos *= len(axis.check_values())
    if len(axes) < 2 or combos > MAX_CHECKED_COMBINATIONS:
        return
    for values in itertools.product(*[a.check_values() for a in axes]):
        point = {a.key: v for a, v in zip(axes, values)}
        try:
            config_from_dict(apply_point(base_tree, point))
        except ConfigError as exc:
            raise ConfigError(f"the sweep point {point} is invalid ({', '.join(a.where for a in axes)}): "
                              f"{exc}") from exc


def check_search_alg(axes: list[Axis], tc: TuneConfig) -> None:
    """Optuna's TPE samples numbers and scalar categories; it has no grid."""
    if tc.search_alg != "optuna":
        return
    for axis in axes:
        if axis.sampler == "grid":
            raise ConfigError(f"{axis.where}: tune.search_alg = optuna has no grid axes; write it as "
                              f"{{choice: {list(axis.args)}}}")
        if axis.sampler == "choice" and any(isinstance(v, (list, dict)) for v in axis.args):
            raise ConfigError(f"{axis.where}: tune.search_alg = optuna chooses among numbers or strings only; "
                              f"search a pair's elements as {axis.key}[0] and {axis.key}[1]")


def param_space(axes: list[Axis], shuffle_seed: int | None = None, shuffle: bool = False) -> dict[str, Any]:
    """``Tuner(param_space=...)``: each axis as a Ray Tune sampler.

    With ``shuffle`` and only grid axes, the grid's points come as one grid axis of whole points
    (``GRID_POINT``) in a seeded random order instead of Tune's nested order (why:
    ``tune.sweep.sweep_param_space``); :func:`point_of` reads a trial's point back either way.
    """
    from ray import tune

    if shuffle and axes and all(a.sampler == "grid" for a in axes):
        points = [dict(zip((a.key for a in axes), values))
                  for values in itertools.product(*(a.args for a in axes))]
        random.Random(shuffle_seed).shuffle(points)
        return {GRID_POINT: tune.grid_search(points)}
    samplers = {"grid": lambda *a: tune.grid_search(list(a)), "choice": lambda *a: tune.choice(list(a)),
                "uniform": tune.uniform, "quniform": tune.quniform, "loguniform": tune.loguniform,
                "qloguniform": tune.qloguniform, "randint": tune.randint, "qrandint": tune.qrandint,
                "lograndint": tune.lograndint}
    return {a.key: samplers[a.sampler](*a.args) for a in axes}


def point_of(trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's point (dotted key -> value) from its Tune config, shuffled grid or not."""
    config = dict(trial_config or {})
    return dict(config.pop(GRID_POINT, {}) or {}) | config
