"""The PromQL lexing the e2e test relies on (tests/deploy/promql.py)."""

from tests.deploy import promql


def test_selectors_leave_out_functions_label_lists_and_ranges():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(x_bucket{code!="OK", a=~"b|}"}[5m]))) '
            '/ on(model) group_left(version) y or vector(0)')
    assert [str(s) for s in promql.vector_selectors(expr)] == ['x_bucket{code!="OK", a=~"b|}"}', "y"]


def test_metric_names_may_hold_colons():
    assert promql.metric_names("time() - tensoryard:engine_last_step_timestamp_seconds > 30") == {
        "tensoryard:engine_last_step_timestamp_seconds"}


def test_comparisons_become_bool_outside_matchers():
    expr = 'a{code!="OK"} > 0.9 and b == bool 1 or c <= 2'
    assert promql.comparisons_as_bool(expr) == 'a{code!="OK"} > bool 0.9 and b == bool 1 or c <= bool 2'


def test_variables_become_the_regex_of_all_their_values():
    expr = 'x{model=~"$model", instance=~"${instance}"}[$__rate_interval]'
    substituted = promql.substitute(expr, {"model": ["a", "b"], "instance": ["127.0.0.1:80"]})
    assert substituted == r'x{model=~"(a|b)", instance=~"(127\\.0\\.0\\.1:80)"}[1m]'


def test_label_values_queries_parse():
    assert promql.parse_label_values('label_values(up{job="w"}, instance)') == ('up{job="w"}', "instance")
    assert promql.parse_label_values("label_values(model)") == (None, "model")
