"""On the default model, one edit of each method lands (the literature's T=1 pattern; docs/small_model.md
has the figures). Three ZsRE requests per method (one for the rank-one family, which does not land yet),
edited one at a time and restored."""
import pytest

from wise_bench.loop import run

pytestmark = pytest.mark.integration

# Measured, not hoped for: on this model a δ at the subject's last token cannot move the answer
# (docs/small_model.md, "Locate-then-edit"), so the rank-one family does not land yet. Strict: the
# test fails once they do, so this list gets updated.
RANK_ONE = ("rome", "memit", "alphaedit")
NO_SUBJECT_PATHWAY = pytest.mark.xfail(strict=True, reason="no subject-position recall pathway in models/small")
LANDING = ["ft_m", "grace", "wise", "wise_retrieve", "memoir", *(pytest.param(m, marks=NO_SUBJECT_PATHWAY) for m in RANK_ONE)]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")  # second moments for ROME/MEMIT/AlphaEdit, shared


@pytest.mark.parametrize("method", LANDING)
def test_single_edits_land_on_the_default_model(compose, shared_data, tmp_path, stats_dir, method):
    n = 1 if method in RANK_ONE else 3  # one request is enough to see whether they land; it saves a minute
    overrides = [f"method={method}", "dataset=zsre", "edit_mode=single", f"num_edits={n}", f"eval_every={n}",
                 f"data_dir={shared_data}"]
    if method in RANK_ONE:
        overrides += [f"method.stats_dir={stats_dir}", "method.mom2_n_samples=20000"]
    results = run(compose(["model=small", *overrides]), tmp_path)
    assert results["pre"]["rel"] < 0.5  # the new targets were not known
    assert results["rel"] >= 0.9
    if method != "ft_m":
        assert results["loc"] >= 0.9
