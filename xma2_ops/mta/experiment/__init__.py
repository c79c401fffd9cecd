"""The multi-task experiment as a library (the command line is ``python -m xma2_ops.mta``).

data.py (tasks), backbone.py (build, train, cache, ADC clips), runtime.py (DDP, loaders), runs.py
(the method list), evaluate.py (ideal cells, chips, noise-aware training), loop.py (the run loop),
stats.py (summaries, paired differences, t intervals), targets.py, report.py (tables, plots, files),
estimate.py (the cost of the full run), cli.py (arguments), threads.py (OpenMP wait policy),
device_sweep.py (the backbone on imperfect cells).  Heavy dependencies (matplotlib, scipy,
scikit-learn, mlxtend) are imported where they are used.
"""
