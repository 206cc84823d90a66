"""threshold's tests.

Hypothesis runs here on shared, loaded machines (CI runs trial with two
workers beside the real peers the tests start): a property's examples are
judged by their results, never by how long one took to run or to generate,
so the per-example deadline and the "too slow" health checks are off. The
number of examples stays Hypothesis's default.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "threshold",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("threshold")
