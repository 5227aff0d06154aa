"""Method registry: ``method=<name>`` on the command line picks ``METHODS[name]``.

Adding a method = one file here, one YAML under conf/method/, one entry below.
"""
from wise_bench.methods.base import EditContext, Method
from wise_bench.methods.ft import FT

METHODS: dict[str, type[Method]] = {
    "ft_l": FT,
    "ft_m": FT,
}

__all__ = ["METHODS", "EditContext", "Method"]
