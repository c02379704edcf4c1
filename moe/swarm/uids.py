"""Expert uids on a grid: ``<prefix>.<i>.<j>...`` for a grid such as [8, 8] (hivemind's layout)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hivemind.moe.expert_uid import UID_DELIMITER, is_valid_prefix


def check_prefix(prefix: str) -> str:
    """The grid prefix without its trailing dot; ``ValueError`` if hivemind would reject it."""
    prefix = prefix.rstrip(UID_DELIMITER)
    if not is_valid_prefix(prefix + UID_DELIMITER) or UID_DELIMITER in prefix:
        raise ValueError(f"expert prefix {prefix!r} must be one word without dots, e.g. 'ffn' (uids are ffn.<i>.<j>)")
    return prefix


def grid_uids(prefix: str, grid_size: Sequence[int]) -> list[str]:
    """Every uid of the grid, row-major: ``prefix.0.0, prefix.0.1, ...``."""
    prefix = check_prefix(prefix)
    if not grid_size or any(g < 1 for g in grid_size):
        raise ValueError(f"grid_size must be a non-empty list of positive ints, got {list(grid_size)}")
    return [UID_DELIMITER.join([prefix, *map(str, c)]) for c in itertools.product(*(range(g) for g in grid_size))]


def uid_coords(uid: str, prefix: str) -> tuple[int, ...]:
    """Grid coordinates of ``uid`` under ``prefix``: ``'ffn.3.5' -> (3, 5)``."""
    prefix = check_prefix(prefix)
    head = prefix + UID_DELIMITER
    if not uid.startswith(head):
        raise ValueError(f"expert uid {uid!r} is not under prefix {prefix!r}")
    return tuple(int(c) for c in uid[len(head) :].split(UID_DELIMITER))


def uid_prefix(uid: str) -> str:
    """The grid prefix of an expert uid: ``'ffn.3.5' -> 'ffn'``."""
    return uid.split(UID_DELIMITER, 1)[0]
