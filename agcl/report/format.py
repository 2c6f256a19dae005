"""How the report writes numbers and orders methods: one place for the tables and the statistics
section."""

from __future__ import annotations

import pandas as pd

from agcl.config import default_roles


def num(value, digits: int = 2) -> str:
    return "–" if pd.isna(value) else f"{value:.{digits}f}"


def signed(value, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if pd.isna(value) else f"{scale * value:+.{digits}f}".replace("-", "−")


def p_text(p) -> str:
    return "–" if pd.isna(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def lower_bound(roles: dict | None) -> str | None:
    """The lower bound of a grid's roles (agcl.config.roles_of); None: the default roles'."""
    return (roles if roles is not None else default_roles())["lower_bound"]


def method_rank(methods: list[str] | None, roles: dict | None = None):
    """Sort key for method names: the lower bound first (as the paper puts its supervised
    baseline), then the config's order, then any other (published-only) method by name."""
    lower = lower_bound(roles)
    order = {m: i for i, m in enumerate(dict.fromkeys([*([lower] if lower else []),
                                                       *(methods or [])]))}
    return lambda method: (order.get(method, len(order)), method)
