"""The benchmark of issue 5: popgate side by side with Dovecot's own POP3 (direct) and Dovecot's
POP3-over-imapc proxy, on one mail store, in one run. See docs/benchmark.md; run it with
``./tests/bench/run`` (``--quick`` for the smoke version).
"""
