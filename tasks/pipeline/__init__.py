"""Pipeline plumbing around the stages: the run's PipelineConfig, the stage cache, terminal progress bars
and the Prefect UI artifacts (charts, trajectory strips).
"""
