"""What a run records and shows: the MLflow store, live progress, the console/log-file split, run comparison.

Everything here runs on the driver (the process of ``medvl run``): workers and Tune trials only report, the
driver writes. See :mod:`medvl.tracking.mlflow_store` for why.
"""
