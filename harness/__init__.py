"""callray's test and measurement harness, apart from the plain library: the benchmark suite
(``suite``, ``targets``, ``report``, ``profile``), the bare Serve floor and the hand-written
baseline it measures against, the chaos and soak runs, and micro-benchmarks. It imports Ray;
``callray/`` never imports it."""
