"""Method registry: ``method=<name>`` on the command line picks ``METHODS[name]``.

Adding a method = one file here, one YAML under conf/method/, one entry below.
"""
from wise_bench.methods.alphaedit import AlphaEdit
from wise_bench.methods.base import EditContext, Method
from wise_bench.methods.defer import DEFER
from wise_bench.methods.ft import FT
from wise_bench.methods.ft_ewc import FTEWC
from wise_bench.methods.grace import GRACE
from wise_bench.methods.memit import MEMIT
from wise_bench.methods.memoir import MEMOIR
from wise_bench.methods.rome import ROME
from wise_bench.methods.ultraedit import UltraEdit
from wise_bench.methods.wise import WISE

METHODS: dict[str, type[Method]] = {
    "ft_l": FT,
    "ft_m": FT,
    "wise": WISE,
    "wise_retrieve": WISE,
    "grace": GRACE,
    "defer": DEFER,
    "ft_ewc": FTEWC,
    "rome": ROME,
    "memit": MEMIT,
    "alphaedit": AlphaEdit,
    "memoir": MEMOIR,
    "ultraedit": UltraEdit,
}

__all__ = ["METHODS", "EditContext", "Method"]
