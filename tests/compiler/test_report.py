"""The rewrite report of each tiny family: every pattern of the model rewritten, as often as its config implies."""

import pytest

from tests.compiler.rewrite_utils import expected_rewrites


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_report(families, name):
    family = families(name)
    program = family.program
    assert program.kernel_rewrites == expected_rewrites(name, family.model.config)
    # What the counts mean: nothing the kernels replace is left in the program.
    for op in ("scaled_dot_product_attention", "aten.layer_norm", "rsqrt", "aten.linear", "aten.addmm", "aten.neg"):
        assert op not in program.code
    assert "higher_order" not in program.code and not [n for n in program.gm.graph.nodes if n.op == "get_attr"]
    report = program.report
    assert all(isinstance(v, int) and v > 0 for v in report.values())
    assert list(report) == sorted(report)  # run_passes sorts it, as the manifest shows it
    assert family.max_diff <= 1e-4
